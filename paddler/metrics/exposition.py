"""Prometheus's text exposition format (version 0.0.4), from the summed counters and
the slot table as it is at the scrape."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from paddler.metrics.demand import Demand
from paddler.metrics.families import (
    COPY_TRUST,
    COUNTERS,
    DESIRED,
    HISTOGRAMS,
    HOST_TRUST,
    PREFILL_RATE,
    QUEUE_DEPTH,
    QUEUE_OLDEST,
    QUEUE_REJECTIONS,
    QUEUE_TIMEOUTS,
    REPORT_AGE,
    RESERVATIONS,
    SLOTS_BUSY,
    SLOTS_IDLE,
    SLOTS_TOTAL,
    UPSTREAM_STATE,
    UPSTREAMS,
    UTILIZATION,
    Family,
)
from paddler.metrics.recorder import labels
from paddler.slots import UpstreamRow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNLABELLED = (QUEUE_TIMEOUTS, QUEUE_REJECTIONS)


@dataclass(frozen=True)
class Learned:
    """What cache_aware learned from llama.cpp's timings (paddler/prefixes/index.py)."""

    copy_trust: float
    host_trust: float
    prefill_rate: float


@dataclass(frozen=True)
class FleetSnapshot:
    """What the gauges say, read from the slot table at the scrape."""

    rows: list[UpstreamRow]
    states: dict[int, str]  # row index -> state name (ready, stale, ejected...)
    queued: int
    oldest_wait: float
    demand: Demand
    now: float
    learned: Learned | None = None  # None: the routing policy keeps no prefix index


def render(counters: dict[str, float], fleet: FleetSnapshot) -> str:
    lines: list[str] = []
    for family in COUNTERS:
        _header(lines, family)
        samples = {key: value for key, value in counters.items() if _family_of(key) == family.name}
        if family in UNLABELLED:
            samples.setdefault(family.name, 0.0)  # a plain counter is there from the start
        lines.extend(f"{key} {_number(value)}" for key, value in sorted(samples.items()))
    for family in HISTOGRAMS:
        _header(lines, family)
        lines.extend(_histogram(family, counters))
    _gauges(lines, fleet)
    return "\n".join(lines) + "\n"


def _header(lines: list[str], family: Family) -> None:
    lines.append(f"# HELP {family.name} {family.help}")
    lines.append(f"# TYPE {family.name} {family.kind}")


def _family_of(key: str) -> str:
    return key.split("{", 1)[0]


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _histogram(family: Family, counters: dict[str, float]) -> list[str]:
    """Cumulative buckets from the one-by-one counts the recorder keeps."""
    bucket_prefix = family.name + "_bucket{"
    per_labels: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in counters.items():
        if key.startswith(bucket_prefix):
            inner, _, bound = key[len(bucket_prefix) : -1].rpartition('le="')
            per_labels[inner.rstrip(",")][bound.rstrip('"')] = value
    lines = []
    for label_text in sorted(per_labels):
        counts = per_labels[label_text]
        inner = label_text + "," if label_text else ""
        running = 0.0
        for bound in [f"{b:g}" for b in family.buckets] + ["+Inf"]:
            running += counts.get(bound, 0.0)
            lines.append(f'{family.name}_bucket{{{inner}le="{bound}"}} {_number(running)}')
        suffix = f"{{{label_text}}}" if label_text else ""
        lines.append(
            f"{family.name}_sum{suffix} {_number(counters.get(f'{family.name}_sum{suffix}', 0.0))}"
        )
        lines.append(f"{family.name}_count{suffix} {_number(running)}")
    return lines


def _gauges(lines: list[str], fleet: FleetSnapshot) -> None:
    _header(lines, QUEUE_DEPTH)
    lines.append(f"{QUEUE_DEPTH.name} {fleet.queued}")
    _header(lines, QUEUE_OLDEST)
    lines.append(f"{QUEUE_OLDEST.name} {round(fleet.oldest_wait, 3)}")
    _header(lines, UPSTREAMS)
    by_state: dict[str, int] = defaultdict(int)
    for row in fleet.rows:
        by_state[fleet.states[row.index]] += 1
    for state in sorted(by_state):
        lines.append(f'{UPSTREAMS.name}{{state="{state}"}} {by_state[state]}')
    _header(lines, DESIRED)
    lines.append(f"{DESIRED.name} {fleet.demand.desired_upstreams}")
    _header(lines, UTILIZATION)
    lines.append(f"{UTILIZATION.name} {_number(fleet.demand.utilization)}")
    per_row: tuple[tuple[Family, Callable[[UpstreamRow], float]], ...] = (
        (SLOTS_TOTAL, lambda row: row.slots_total),
        (SLOTS_IDLE, lambda row: row.free_slots),
        (SLOTS_BUSY, lambda row: row.slots_total - row.free_slots),
        (RESERVATIONS, lambda row: row.reservations),
        (REPORT_AGE, lambda row: round(row.age(fleet.now), 3)),
    )
    for family, value_of in per_row:
        _header(lines, family)
        for row in fleet.rows:
            text = labels(upstream=row.name, address=row.address, model=row.model)
            lines.append(f"{family.name}{{{text}}} {_number(value_of(row))}")
    _header(lines, UPSTREAM_STATE)
    for row in fleet.rows:
        text = labels(upstream=row.name, address=row.address, state=fleet.states[row.index])
        lines.append(f"{UPSTREAM_STATE.name}{{{text}}} 1")
    learned = fleet.learned
    if learned is not None:
        for family, value in (
            (COPY_TRUST, learned.copy_trust),
            (HOST_TRUST, learned.host_trust),
            (PREFILL_RATE, learned.prefill_rate),
        ):
            _header(lines, family)
            lines.append(f"{family.name} {_number(value)}")
