"""Which upstreams a request may use: the policy the slot table chooses by.

Split in two so that the table can choose among a thousand upstreams fast: what
changes only with the table's structure (an upstream's state and model, which ones a
retry excludes) is matched once and remembered; what changes with time (a report
gone stale, an ejection) is checked on the upstream about to be chosen.
"""

from pathlib import PurePath
from typing import TYPE_CHECKING, Final

from paddler.slots.layout import UpstreamState

if TYPE_CHECKING:
    from paddler.slots.table import UpstreamRow

# States whose upstreams can serve, best first: ready ones; without /slots only our own
# reservations are known, which is still better than nothing; asleep ones cost a wake-up.
SERVING: Final = {UpstreamState.READY: 2, UpstreamState.SLOTS_DISABLED: 1, UpstreamState.ASLEEP: 0}


def model_names(model: str) -> set[str]:
    """The names a client may use for an upstream's model: as reported, file name, stem."""
    if not model:
        return set()
    name = PurePath(model).name
    names = {model, name}
    if name.endswith(".gguf"):
        names.add(name[: -len(".gguf")])
    return names


class Policy:
    """Serving, fresh, not ejected, of the model asked for, not excluded; most free first.

    A plain slotted class: one is made for every request."""

    __slots__ = (
        "exclude",
        "imbalance",
        "key",
        "missed_reports",
        "model",
        "now",
        "prefer",
        "ranks",
        "spread",
    )

    def __init__(
        self,
        now: float,
        missed_reports: int,
        model: str | None = None,
        exclude: frozenset[tuple[int, int]] = frozenset(),
        prefer: tuple[int, ...] = (),
        imbalance: int = 0,
        ranks: tuple[int, ...] = (),
        spread: bool = False,
    ) -> None:
        self.now = now
        self.missed_reports = missed_reports
        self.model = model
        self.exclude = exclude
        # Rows to take before the least busy one (cache-aware routing, sticky sessions),
        # as long as one has a free slot and at most ``imbalance`` - 1 fewer free slots
        # than the least busy; among those, the best rank (``ranks``, by position; none:
        # each its own, in order), then the most free slots. The line's order is kept.
        self.prefer = prefer
        self.imbalance = imbalance
        self.ranks = ranks or tuple(range(len(prefer)))
        # Ties for the most free slots go to the row that took a request longest ago
        # rather than the first row always: cache-aware routing spreads new prompts over
        # the fleet's caches, and a new prefill over the servers least likely to be in
        # one. (least_busy keeps the first: at low load one server takes most requests,
        # and its cache serves repeats by luck.)
        self.spread = spread
        # What the structural part of the match depends on.
        self.key = (model, exclude)

    def matches(
        self, state: UpstreamState, model: str, index: int, generation: int, drained: bool
    ) -> bool:
        """The structural part: state, model, exclusion, drained by an operator."""
        return (
            state in SERVING
            and not drained
            and (self.model is None or self.model in model_names(model))
            and (index, generation) not in self.exclude
        )

    def fresh(self, last_report: float, interval: float, ejected_until: float) -> bool:
        """The part that changes with time: a recent report, no ejection."""
        return (
            self.now - last_report <= self.missed_reports * interval and ejected_until <= self.now
        )

    def __call__(self, rows: "list[UpstreamRow]") -> "list[UpstreamRow]":
        """The rows this policy allows, best first (for callers that hold rows already)."""
        fit = [
            row
            for row in rows
            if self.matches(row.state, row.model, row.index, row.generation, row.drained)
            and self.fresh(row.last_report, row.interval, row.ejected_until)
        ]
        fit.sort(
            key=lambda row: (SERVING[row.state], row.free_slots, -row.reservations), reverse=True
        )
        return fit
