"""What paddlerd runs: one ChildSpec per role entry of the configuration."""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath

from paddler.config import Config, LlamaCppSettings

# Stop order: the balancer first so that requests in flight can finish, then the
# agents, then the llama-servers that were serving those requests.
STOP_ORDER = ("balancer", "agent", "llamacpp")

# systemd's variables belong to paddlerd alone: a child that inherited them could
# notify on paddlerd's behalf or claim its sockets.
_PRIVATE_ENVIRONMENT = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


@dataclass(frozen=True)
class HealthCheck:
    """An HTTP GET that must answer 200 before a child counts as running."""

    host: str
    port: int
    path: str = "/health"


@dataclass(frozen=True)
class ChildSpec:
    name: str
    role: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    health: HealthCheck | None
    startup_timeout: float


def child_specs(config: Config) -> dict[str, ChildSpec]:
    specs: list[ChildSpec] = []
    if config.balancer is not None:
        balancer = config.balancer
        # Running once its management API answers: agents can report from then on.
        health = HealthCheck(_reachable(balancer.management_host), balancer.management_port)
        specs.append(_python_role("balancer", "balancer", dataclasses.asdict(balancer), health))
    for index, agent in enumerate(config.agents):
        name = f"agent.{agent.name or index}"
        specs.append(_python_role(name, "agent", dataclasses.asdict(agent)))
    specs.extend(_llamacpp(instance) for instance in config.llamacpps)
    return {spec.name: spec for spec in specs}


def child_environment(extra: dict[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    environment = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENVIRONMENT}
    environment.update(extra or {})
    return tuple(sorted(environment.items()))


def _python_role(
    name: str, role: str, settings: dict[str, object], health: HealthCheck | None = None
) -> ChildSpec:
    argv = (sys.executable, "-m", "paddler.roles", role, json.dumps(settings, sort_keys=True))
    return ChildSpec(name, role, argv, child_environment(), health, 60.0)


def llamacpp_argv(instance: LlamaCppSettings) -> tuple[str, ...]:
    # --metrics: the agent reads busy slots from /metrics, which (unlike /slots) does not
    # keep a llama-server started with --sleep-idle-seconds from falling asleep.
    argv = [
        instance.binary,
        "--model",
        instance.model,
        "--host",
        instance.host,
        "--port",
        str(instance.port),
        "--parallel",
        str(instance.slots),
        "--metrics",
    ]
    alias = instance.alias or PurePath(instance.model).name.removesuffix(".gguf")
    argv += ["--alias", alias]
    if instance.context_size is not None:
        argv += ["--ctx-size", str(instance.context_size)]
    return (*argv, *instance.extra_args)


def role_of(argv: list[str]) -> str:
    """The child a command line belongs to, as paddlerctl shows it: the inverse of the
    command lines built here ("agent.gpu0", "balancer", "llamacpp :8081")."""
    if "paddler.roles" in argv:
        role = argv[argv.index("paddler.roles") + 1]
        name = json.loads(argv[-1]).get("name")
        return f"{role}.{name}" if name else role
    if "--port" in argv:
        return f"llamacpp :{argv[argv.index('--port') + 1]}"
    return Path(argv[0]).name if argv else "?"


def _llamacpp(instance: LlamaCppSettings) -> ChildSpec:
    return ChildSpec(
        name=f"llamacpp.{instance.name}",
        role="llamacpp",
        argv=llamacpp_argv(instance),
        env=child_environment(instance.env),
        health=HealthCheck(_reachable(instance.host), instance.port),
        startup_timeout=instance.startup_timeout,
    )


def _reachable(listen_host: str) -> str:
    """The address to probe a server that listens on ``listen_host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen_host, listen_host)
