"""Which upstreams a request may go to, and which endpoints take a slot."""

import zlib

from paddler.slots import UpstreamRow, UpstreamState
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
) -> Policy:
    """The policy: serving, fresh, not ejected, of the model asked for; most free first,
    unless one of ``prefer`` has a free slot and is not too much busier."""
    return Policy(now, missed_reports, model, exclude, prefer, imbalance, ranks)


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
