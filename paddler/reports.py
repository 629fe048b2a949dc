"""The report an agent sends to the management API: built and parsed here only.

PUT /api/v1/agents/{agent_id}
{"sequence": 7, "interval": 1.0, "name": "gpu0",
 "upstream": {"host": "10.0.0.5", "port": 8081},
 "state": "ready", "slots": {"total": 4, "idle": 3, "processing": 1},
 "model": "tiny.gguf", "build": "b7000-abc", "error": "",
 "host_cache_tokens": 524288}

host_cache_tokens (optional; agents before it send none): how many tokens of idle
slots' prompts llama.cpp's host-memory prompt cache keeps (paddler/llamacpp/
host_cache.py); 0 or absent: none, or the agent cannot tell.
"""

import re
from typing import Any

from paddler.config.addresses import is_valid_host
from paddler.llamacpp.client import UpstreamStatus
from paddler.slots.layout import UNLIMITED_HOST_CACHE, UpstreamState
from paddler.slots.table import UpstreamReport

AGENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
REPORTED_STATES = {
    state.name.lower(): state
    for state in UpstreamState
    if state not in (UpstreamState.FREE, UpstreamState.REMOVED)
}


KNOWN_FIELDS = frozenset(
    (
        "sequence",
        "interval",
        "name",
        "upstream",
        "state",
        "slots",
        "model",
        "build",
        "error",
        "host_cache_tokens",
    )
)


class ReportError(ValueError):
    """A report the management API refuses, saying which field is wrong."""


def build_report(
    status: UpstreamStatus,
    *,
    sequence: int,
    interval: float,
    name: str,
    host: str,
    port: int,
    host_cache_tokens: int | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "sequence": sequence,
        "interval": interval,
        "name": name,
        "upstream": {"host": host, "port": port},
        "state": status.state.name.lower(),
        "slots": {
            "total": status.slots_total,
            "idle": status.slots_idle,
            "processing": status.slots_processing,
        },
        "model": status.model,
        "build": status.build,
        "error": status.error,
    }
    if host_cache_tokens is not None:
        report["host_cache_tokens"] = host_cache_tokens
    return report


def parse_report(agent_id: str, payload: Any) -> UpstreamReport:
    if not AGENT_ID.match(agent_id):
        raise ReportError("the agent id in the path must be 1-32 letters, digits, '-' or '_'")
    if not isinstance(payload, dict):
        raise ReportError("the report must be a JSON object")
    if not KNOWN_FIELDS.issuperset(payload):
        unknown = sorted(set(payload) - KNOWN_FIELDS)
        raise ReportError(f"unknown field {unknown[0]!r}")
    upstream = _object(payload, "upstream")
    slots = _object(payload, "slots")
    host = _string(upstream, "host", "upstream.host")
    if not is_valid_host(host):
        raise ReportError(f"field 'upstream.host' is not a valid address: {host!r}")
    state_name = _string(payload, "state", "state")
    if state_name not in REPORTED_STATES:
        raise ReportError(f"field 'state' must be one of {', '.join(REPORTED_STATES)}")
    total = _count(slots, "total", "slots.total")
    idle = _count(slots, "idle", "slots.idle")
    processing = _count(slots, "processing", "slots.processing")
    if idle + processing > total:
        raise ReportError(
            "fields 'slots.idle' and 'slots.processing' add up to more than 'slots.total'"
        )
    interval = payload.get("interval")
    if (
        not isinstance(interval, int | float)
        or isinstance(interval, bool)
        or not 0.01 <= interval <= 3600
    ):
        raise ReportError("field 'interval' must be a number of seconds from 0.01 to 3600")
    port = upstream.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ReportError("field 'upstream.port' must be a port from 1 to 65535")
    sequence = payload.get("sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or not 0 < sequence < 2**63:
        raise ReportError("field 'sequence' must be a positive integer")
    host_cache = payload.get("host_cache_tokens", 0)
    if (
        not isinstance(host_cache, int)
        or isinstance(host_cache, bool)
        or not 0 <= host_cache <= UNLIMITED_HOST_CACHE
    ):
        raise ReportError(
            f"field 'host_cache_tokens' must be a whole number from 0 to {UNLIMITED_HOST_CACHE}"
        )
    return UpstreamReport(
        agent_id=agent_id,
        name=_string(payload, "name", "name"),
        host=host,
        port=port,
        state=REPORTED_STATES[state_name],
        slots_total=total,
        slots_idle=idle,
        slots_processing=processing,
        model=_string(payload, "model", "model"),
        build=_string(payload, "build", "build"),
        error=_string(payload, "error", "error"),
        sequence=sequence,
        interval=float(interval),
        host_cache_tokens=host_cache,
    )


def _object(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload.get(key)
    if not isinstance(value, dict):
        raise ReportError(f"field {key!r} must be an object")
    return value


def _string(payload: dict[str, Any], key: str, field: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise ReportError(f"field {field!r} must be a string")
    return value


def _count(payload: dict[str, Any], key: str, field: str) -> int:
    value = payload.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ReportError(f"field {field!r} must be a whole number from 0 to 65535")
    return value
