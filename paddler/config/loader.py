"""Reading and validating the TOML file into a Config.

Validation collects every problem before giving up, so that an operator fixes a
file in one pass, and it runs entirely before paddlerd starts anything.
"""

import dataclasses
import difflib
import os
import re
import shutil
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import tomlkit
from tomlkit.exceptions import ParseError

from paddler.config.addresses import (
    AWS_LOCAL_IPV4,
    is_valid_host,
    listeners_conflict,
    parse_address,
)
from paddler.config.errors import ConfigError, Problem
from paddler.config.locate import line_of, locate_keys
from paddler.config.model import SECTIONS, Config, PaddlerdSettings

DEFAULT_CONFIG_PATH = Path("/etc/paddler/paddler.toml")
T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def load_config(path: Path, *, check_files: bool = True) -> Config:
    """Read and validate ``path``; raise ConfigError naming every problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [Problem("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(source, [Problem("", f"cannot read: {error}")]) from None
    return parse_config(text, path, check_files=check_files)


def parse_config(text: str, path: Path, *, check_files: bool = True) -> Config:
    source = str(path)
    try:
        document = tomlkit.parse(text)
    except ParseError as error:
        message = str(error).split(" at line ")[0]
        raise ConfigError(source, [Problem("", f"not valid TOML: {message}", error.line)]) from None
    validator = _Validator(locate_keys(text), path.parent.resolve(), check_files)
    config = validator.build(document.unwrap(), path)
    if validator.problems:
        raise ConfigError(source, validator.problems)
    return config


class _Validator:
    def __init__(self, lines: dict[str, int], base_dir: Path, check_files: bool) -> None:
        self.lines = lines
        self.base_dir = base_dir
        self.check_files = check_files
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message, line_of(self.lines, key)))

    def build(self, data: dict[str, Any], path: Path) -> Config:
        for name in data:
            if name not in SECTIONS:
                self.problem(name, f"unknown section{_suggest(name, SECTIONS)}")
        sections: dict[str, Any] = {}
        for name, (cls, is_array) in SECTIONS.items():
            if name not in data:
                continue
            value = data[name]
            if is_array:
                if not isinstance(value, list):
                    self.problem(name, f"must be written [[{name}]] (an array of tables)")
                    continue
                built = [self.section(f"{name}[{i}]", cls, item) for i, item in enumerate(value)]
                sections[name] = tuple(item for item in built if item is not None)
            elif not isinstance(value, dict):
                self.problem(name, f"must be a table, written [{name}]")
            else:
                sections[name] = self.section(name, cls, value)
        config = Config(
            source=path,
            paddlerd=sections.get("paddlerd") or PaddlerdSettings(),
            balancer=sections.get("balancer"),
            agents=sections.get("agent", ()),
            llamacpps=sections.get("llamacpp", ()),
        )
        self.check_whole(config)
        return config

    def section(self, prefix: str, cls: type[Any], data: Any) -> Any:
        if not isinstance(data, dict):
            self.problem(prefix, "must be a table")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        count_before = len(self.problems)
        for key in data:
            if key not in fields:
                self.problem(_join(prefix, key), f"unknown key{_suggest(key, fields)}")
        values: dict[str, Any] = {}
        for name, spec in fields.items():
            key = _join(prefix, name)
            if name not in data:
                if spec.metadata.get("required"):
                    self.problem(key, "is required")
                elif spec.metadata.get("check") == "executable":
                    # The default names a program too, and it must exist as well.
                    values[name] = self.executable(key, str(spec.default))
                continue
            value = self.value(key, spec, data[name])
            if value is not None:
                values[name] = value
        if len(self.problems) > count_before:
            return None
        return cls(**values)

    def value(self, key: str, spec: dataclasses.Field[Any], raw: Any) -> Any:
        expected = _strip_optional(spec.type)
        value = _coerce(expected, raw)
        if value is None:
            self.problem(key, f"must be {_describe(expected)}, not {_describe_value(raw)}")
            return None
        metadata: Mapping[str, Any] = spec.metadata
        minimum = metadata.get("minimum")
        if minimum is not None and value < minimum:
            self.problem(key, f"must be at least {minimum}, not {value}")
            return None
        maximum = metadata.get("maximum")
        if maximum is not None and value > maximum:
            self.problem(key, f"must be at most {maximum}, not {value}")
            return None
        choices = metadata.get("choices")
        if choices and value not in choices:
            self.problem(key, f"must be one of {', '.join(choices)}; not {value!r}")
            return None
        return self.checked(key, metadata.get("check"), value)

    def checked(self, key: str, check: str | None, value: Any) -> Any:
        if check == "file":
            resolved = (self.base_dir / value).resolve()
            if self.check_files and not resolved.is_file():
                self.problem(key, f"no such file: {resolved}")
                return None
            return str(resolved)
        if check == "executable":
            return self.executable(key, value)
        complaint = _complaint(check, value)
        if complaint:
            self.problem(key, complaint)
            return None
        return value

    def executable(self, key: str, value: str) -> str | None:
        if "/" not in value:
            found = shutil.which(value)
            if found is None:
                if self.check_files:
                    self.problem(key, f"{value!r} is not found in PATH; give its full path")
                    return None
                return value
            return found
        resolved = (self.base_dir / value).resolve()
        if self.check_files and not (resolved.is_file() and os.access(resolved, os.X_OK)):
            self.problem(key, f"not an executable file: {resolved}")
            return None
        return str(resolved)

    def check_whole(self, config: Config) -> None:
        names: dict[str, int] = {}
        for index, instance in enumerate(config.llamacpps):
            if instance.name in names:
                self.problem(
                    f"llamacpp[{index}].name",
                    f"{instance.name!r} is already the name of llamacpp[{names[instance.name]}]",
                )
            names.setdefault(instance.name, index)
        listeners: list[tuple[str, str, int]] = []
        balancer = config.balancer
        if balancer is not None:
            listeners.append(
                ("balancer.management_port", balancer.management_host, balancer.management_port)
            )
            listeners.append(
                (
                    "balancer.reverseproxy_port",
                    balancer.reverseproxy_host,
                    balancer.reverseproxy_port,
                )
            )
        for index, instance in enumerate(config.llamacpps):
            listeners.append((f"llamacpp[{index}].port", instance.host, instance.port))
        for position, (key, host, port) in enumerate(listeners):
            for other_key, other_host, other_port in listeners[:position]:
                if port == other_port and listeners_conflict(host, other_host):
                    self.problem(key, f"port {port} is already taken by {other_key}")
                    break
        if balancer is not None and balancer.reverseproxy_port == balancer.management_port:
            # The balancer tells its two servers apart by port, whatever their addresses.
            self.problem("balancer.reverseproxy_port", "must differ from management_port")


def _listed(values: list[str]) -> str:
    return ", ".join(map(repr, values))


def _complaint(check: str | None, value: Any) -> str:
    """What is wrong with ``value`` for a check that needs no context, or ""."""
    if check == "port" and not 1 <= value <= 65535:
        return f"must be a port from 1 to 65535, not {value}"
    if check == "host" and not is_valid_host(value):
        return f"is not a valid IP address or host name: {value!r}"
    if check == "agent_host" and value != AWS_LOCAL_IPV4 and not is_valid_host(value):
        return f"is not a valid IP address or host name, nor {AWS_LOCAL_IPV4!r}: {value!r}"
    if check == "token" and (not value or any(c.isspace() for c in value)):
        return "must be a non-empty string without spaces"
    if check == "tokens" and any(not key or any(c.isspace() for c in key) for key in value):
        return "must be non-empty strings without spaces"
    if check == "name" and not _NAME.match(value):
        return f"must be 1-63 letters, digits, '.', '_' or '-': {value!r}"
    if check in ("url", "address"):
        return _endpoint_complaint(check, value)
    if check == "addresses":
        bad = [address for address in value if parse_address(address) is None]
        if not value:
            return "must name at least one host:port"
        if bad:
            return f"must be host:port entries; not {_listed(bad)}"
    if check == "paths":
        bad = [path for path in value if not path.startswith("/")]
        if bad:
            return f"paths start with '/'; not {_listed(bad)}"
    return ""


def _endpoint_complaint(check: str, value: str) -> str:
    if check == "url" and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        return f"must be an http:// or https:// URL, not {value!r}"
    if check == "address" and parse_address(value) is None:
        return f"must be host:port, not {value!r}"
    return ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def validate_section(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Settings of one section from plain values (the command line builds them so)."""
    validator = _Validator({}, Path.cwd(), check_files=True)
    settings = validator.section("", cls, data)
    if validator.problems:
        raise ConfigError(source, validator.problems)
    return cast(T, settings)


def _strip_optional(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _coerce(expected: Any, raw: Any) -> Any:
    """``raw`` as the expected type, or None when it is not of that type."""
    if expected is bool:
        return raw if isinstance(raw, bool) else None
    if expected is int:
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    if expected is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        return None
    if expected is str:
        return raw if isinstance(raw, str) else None
    origin = typing.get_origin(expected)
    if origin is list:
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return list(raw)
        return None
    if origin is dict:
        if isinstance(raw, dict) and all(isinstance(item, str) for item in raw.values()):
            return dict(raw)
        return None
    raise TypeError(f"no rule for settings of type {expected!r}")


def _describe(expected: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if expected in names:
        return names[expected]
    if typing.get_origin(expected) is list:
        return "a list of strings"
    return "a table of strings"


def _describe_value(raw: Any) -> str:
    if isinstance(raw, bool):
        return f"the boolean {str(raw).lower()}"
    if isinstance(raw, int | float):
        return f"the number {raw}"
    if isinstance(raw, str):
        return f"the string {raw!r}"
    if isinstance(raw, list):
        return "a list" if all(isinstance(i, str) for i in raw) else "a list with non-strings"
    if isinstance(raw, dict):
        return "a table"
    return f"a {type(raw).__name__}"


def _suggest(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
