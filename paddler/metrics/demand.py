"""The autoscaling signal: how many upstreams the current demand calls for."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from paddler.slots import UpstreamRow
from paddler.slots.view import in_rotation


@dataclass(frozen=True)
class Demand:
    upstreams: int  # in rotation now
    slots_total: int
    slots_busy: int
    queued: int
    slots_per_upstream: float
    desired_upstreams: int
    # (busy slots + queued requests) / slots in rotation: what a target-tracking
    # autoscaler holds near its target. With no slot at all, 1 while requests wait.
    utilization: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def demand(rows: list[UpstreamRow], queued: int, now: float, missed_reports: int) -> Demand:
    """Busy slots plus waiting requests, over the slots an upstream brings.

    An upstream brings the fleet's average slot count. With no upstream in rotation
    there is no average to go by: waiting requests then call for one upstream (scale from
    zero), whose report tells the next answer its size; no demand calls for none.
    """
    serving = [row for row in rows if in_rotation(row, now, missed_reports)]
    total = sum(row.slots_total for row in serving)
    busy = sum(row.slots_total - row.free_slots for row in serving)
    wanted = busy + queued
    if serving and total:
        per_upstream = total / len(serving)
        desired = math.ceil(wanted / per_upstream - 1e-9)
    else:
        per_upstream = 0.0
        desired = 1 if wanted else 0
    if queued:
        desired = max(desired, 1)
    return Demand(
        upstreams=len(serving),
        slots_total=total,
        slots_busy=busy,
        queued=queued,
        slots_per_upstream=round(per_upstream, 3),
        desired_upstreams=desired,
        utilization=round(wanted / total, 3) if total else float(bool(wanted)),
    )
