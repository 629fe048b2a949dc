"""Which upstreams a request may go to, and which endpoints take a slot."""

import zlib
from typing import ClassVar

from paddler.slots import SlotTable, UpstreamRow, UpstreamState
from paddler.slots.policy import Policy, model_names


def model_key(model: str) -> int:
    """The key that says which waiters want the same model (0: any model)."""
    return zlib.crc32(model.encode()) or 1 if model else 0


def eligible(
    now: float,
    missed_reports: int,
    model: str | None,
    exclude: frozenset[tuple[int, int]] = frozenset(),
    prefer: tuple[int, ...] = (),
    imbalance: int = 0,
    ranks: tuple[int, ...] = (),
    spread: bool = False,
) -> Policy:
    """The policy: serving, fresh, not ejected, of the model asked for; most free first,
    unless one of ``prefer`` has a free slot and is not too much busier."""
    return Policy(now, missed_reports, model, exclude, prefer, imbalance, ranks, spread)


def fleet_models(rows: list[UpstreamRow]) -> list[str]:
    return sorted(
        {row.model for row in rows if row.model and row.state is not UpstreamState.REMOVED}
    )


def knows_model(rows: list[UpstreamRow], model: str) -> bool:
    return any(
        model in model_names(row.model) for row in rows if row.state is not UpstreamState.REMOVED
    )


def canonical_model(rows: list[UpstreamRow], model: str) -> str:
    """The model as its upstreams report it, so that all names of one model share a line."""
    for row in rows:
        if model in model_names(row.model):
            return row.model
    return model


class ModelLines:
    """The waiting line (model key) of each model name clients ask for, remembered
    while the table's structure stays: reading every row and matching the name against
    each upstream's model on every request cost more than the rest of choosing."""

    BOUND: ClassVar[int] = 1024  # names clients invent: a bound, not a policy

    def __init__(self, table: SlotTable) -> None:
        self.table = table
        self._version = -1
        self._keys: dict[str, int | None] = {}

    def key(self, model: str) -> int | None:
        """The line of the upstreams serving ``model`` (under any of its names), or
        None when the fleet has upstreams and none serves it. With no upstream at all,
        the name's own line: the request waits for one (scale from zero)."""
        version = self.table.structure_version()  # before the rows: never newer than them
        if version != self._version or len(self._keys) > self.BOUND:
            self._version = version
            self._keys.clear()
        try:
            return self._keys[model]
        except KeyError:
            pass
        rows = self.table.rows()
        key = (
            None
            if rows and not knows_model(rows, model)
            else model_key(canonical_model(rows, model))
        )
        self._keys[model] = key
        return key
