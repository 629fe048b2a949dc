"""What an upstream's row means to people: its state name and its JSON description.

One description, used by the management API and by paddlerctl reading the table.
"""

from typing import Any

from paddler.slots.layout import UpstreamState
from paddler.slots.table import UpstreamRow


def in_rotation(row: UpstreamRow, now: float, missed_reports: int) -> bool:
    """Whether the upstream takes new requests: ready, reporting, not drained and not
    ejected (paddler/slots/policy.py skips an ejected upstream)."""
    return state_name(row, now, missed_reports) == "ready"


def state_name(row: UpstreamRow, now: float, missed_reports: int) -> str:
    if row.state is UpstreamState.REMOVED:
        return "removed"
    if row.drained:
        return "draining"
    if row.is_stale(now, missed_reports):
        return "stale"
    if row.state is UpstreamState.READY and row.ejected_until > now:
        # Ready as its agent sees it, but its requests failed here: what the agent
        # reports otherwise (unreachable, loading) says more, so it comes first.
        return "ejected"
    return row.state.name.lower()


def describe(row: UpstreamRow, now: float, missed_reports: int) -> dict[str, Any]:
    return {
        "agent_id": row.agent_id,
        "name": row.name,
        "address": row.address,
        "model": row.model,
        "build": row.build,
        "state": state_name(row, now, missed_reports),
        "in_rotation": in_rotation(row, now, missed_reports),
        "drained": row.drained,
        "error": row.error,
        "slots": {
            "total": row.slots_total,
            "idle": row.slots_idle,
            "processing": row.slots_processing,
            "free": row.free_slots,
        },
        "reservations": row.reservations,
        # Tokens of idle slots' prompts llama.cpp's host cache keeps (0: none, or unknown).
        "host_cache_tokens": row.host_cache_tokens,
        "last_report_age": round(row.age(now), 3),
        "report_interval": row.interval,
    }
