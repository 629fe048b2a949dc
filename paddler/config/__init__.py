"""The host configuration: one TOML file that says which roles this host runs."""

from paddler.config.errors import ConfigError, Problem
from paddler.config.loader import DEFAULT_CONFIG_PATH, load_config, parse_config
from paddler.config.model import (
    AgentSettings,
    BalancerSettings,
    Config,
    LlamaCppSettings,
    PaddlerdSettings,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentSettings",
    "BalancerSettings",
    "Config",
    "ConfigError",
    "LlamaCppSettings",
    "PaddlerdSettings",
    "Problem",
    "load_config",
    "parse_config",
]
