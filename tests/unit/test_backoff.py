import random

from paddler.supervisor.backoff import restart_delay


def test_delay_doubles_per_failure_within_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for failures, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 30.0)]:
        delays = [restart_delay(failures, 1.0, 30.0, rng) for _ in range(200)]
        assert min(delays) >= base / 2
        assert max(delays) <= base
        # Jitter spreads restarts out instead of repeating one value.
        assert max(delays) - min(delays) > base / 4
