"""Which upstreams a request may go to, and which endpoints take a slot."""

import zlib
from collections.abc import Callable
from pathlib import PurePath

from paddler.slots import UpstreamRow, UpstreamState

# States whose upstreams can serve: ready first; asleep ones cost a wake-up; without
# /slots only our own reservations are known, which is still better than nothing.
SERVING = {UpstreamState.READY: 2, UpstreamState.SLOTS_DISABLED: 1, UpstreamState.ASLEEP: 0}


def model_names(model: str) -> set[str]:
    """The names a client may use for an upstream's model: as reported, file name, stem."""
    if not model:
        return set()
    name = PurePath(model).name
    names = {model, name}
    if name.endswith(".gguf"):
        names.add(name[: -len(".gguf")])
    return names


def model_key(model: str) -> int:
    """The key that says which waiters want the same model (0: any model)."""
    return zlib.crc32(model.encode()) or 1 if model else 0


def eligible(
    now: float,
    missed_reports: int,
    model: str | None,
    exclude: frozenset[tuple[int, int]] = frozenset(),
) -> Callable[[list[UpstreamRow]], list[UpstreamRow]]:
    """The policy: serving, fresh, not ejected, of the model asked for; most free first."""

    def choose(rows: list[UpstreamRow]) -> list[UpstreamRow]:
        fit = [
            row
            for row in rows
            if row.state in SERVING
            and not row.is_stale(now, missed_reports)
            and row.ejected_until <= now
            and (model is None or model in model_names(row.model))
            and (row.index, row.generation) not in exclude
        ]
        fit.sort(
            key=lambda row: (SERVING[row.state], row.free_slots, -row.reservations), reverse=True
        )
        return fit

    return choose


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
