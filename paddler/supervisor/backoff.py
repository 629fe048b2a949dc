import random

_RANDOM = random.Random()


def restart_delay(
    failures: int, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before the next start after ``failures`` quick failures in a row.

    Exponential, capped, with "equal jitter": half the delay is fixed so a
    crashing child never restarts in a tight loop, half is random so that many
    children that died together do not come back in lockstep.
    """
    base = min(maximum, initial * 2.0 ** max(0, failures - 1))
    source: random.Random = rng if rng is not None else _RANDOM
    return base / 2 + source.uniform(0, base / 2)
