"""llama-server's response formats, read in one place.

llama.cpp changed these formats several times, and each change broke the
original Paddler. Every known shape is accepted here, and anything else is an
UnsupportedFormat error that says what was expected.
"""

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any


class UnsupportedFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Props:
    total_slots: int
    build: str
    model: str
    is_sleeping: bool
    model_path: str = ""


@dataclass(frozen=True)
class SlotCounts:
    idle: int
    processing: int


def parse_props(payload: Any) -> Props:
    """GET /props."""
    if not isinstance(payload, dict):
        raise UnsupportedFormatError("/props did not answer a JSON object")
    total = payload.get("total_slots")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise UnsupportedFormatError("/props has no total_slots count")
    alias = payload.get("model_alias")
    path = payload.get("model_path")
    model = alias if isinstance(alias, str) and alias else ""
    if not model and isinstance(path, str) and path:
        model = PurePath(path).name
    build = payload.get("build_info")
    return Props(
        total_slots=total,
        build=build if isinstance(build, str) else "",
        model=model,
        is_sleeping=payload.get("is_sleeping") is True,
        model_path=path if isinstance(path, str) else "",
    )


def parse_slots(payload: Any) -> SlotCounts:
    """GET /slots: ``is_processing`` (current builds) or ``state`` 0/1 (older builds)."""
    if not isinstance(payload, list):
        raise UnsupportedFormatError("/slots did not answer a JSON list")
    processing = 0
    for slot in payload:
        if not isinstance(slot, dict):
            raise UnsupportedFormatError("/slots lists something that is not a slot object")
        if isinstance(slot.get("is_processing"), bool):
            busy = slot["is_processing"]
        elif isinstance(slot.get("state"), int):
            busy = slot["state"] != 0
        else:
            raise UnsupportedFormatError(
                "/slots entries have neither is_processing (true/false) nor state (0/1)"
            )
        processing += 1 if busy else 0
    return SlotCounts(idle=len(payload) - processing, processing=processing)


@dataclass(frozen=True)
class Metrics:
    requests_processing: int
    requests_deferred: int


def parse_metrics(text: str) -> Metrics:
    """GET /metrics (llama-server --metrics), Prometheus text format."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line.partition(" ")
            try:
                values[name] = float(value.split()[0])
            except (ValueError, IndexError):
                continue
    if "llamacpp:requests_processing" not in values:
        raise UnsupportedFormatError("/metrics has no llamacpp:requests_processing")
    return Metrics(
        requests_processing=int(values["llamacpp:requests_processing"]),
        requests_deferred=int(values.get("llamacpp:requests_deferred", 0)),
    )
