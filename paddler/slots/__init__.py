"""The slot table: what the balancer knows of every upstream, shared by all its processes."""

from paddler.slots.layout import LAYOUT_VERSION, UpstreamState
from paddler.slots.table import (
    Applied,
    Reservation,
    SlotTable,
    SlotTableError,
    UpstreamReport,
    UpstreamRow,
)

__all__ = [
    "LAYOUT_VERSION",
    "Applied",
    "Reservation",
    "SlotTable",
    "SlotTableError",
    "UpstreamReport",
    "UpstreamRow",
    "UpstreamState",
]
