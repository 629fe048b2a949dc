"""Many processes reserving at once, some SIGKILLed anywhere, inside the lock too."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from paddler.slots import Applied, SlotTable, UpstreamReport, UpstreamState

SLOTS = 3


def worker(
    table: Path, iterations: int, mode: str = "normal", watched: bool = False
) -> subprocess.Popen[str]:
    output = subprocess.PIPE if watched else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "tests.slot_worker", str(table), str(iterations), mode],
        stdout=output,
        stderr=output,
        text=True,
    )


def test_reservations_survive_processes_killed_at_any_instant(tmp_path: Path) -> None:
    path = tmp_path / "slots.table"
    table = SlotTable.create(path)
    report = UpstreamReport(
        "agent", "a", "127.0.0.1", 8081, UpstreamState.READY, SLOTS, SLOTS, 0, "m", "b", "", 1, 1.0
    )
    assert table.apply_report(report, time.monotonic()) is Applied.NEW
    rng = random.Random(3)

    survivors = [worker(path, 600, watched=True) for _ in range(4)]
    victims: list[subprocess.Popen[str]] = []
    highest = 0
    deadline = time.monotonic() + 60
    # Kill processes at random instants while the survivors keep working.
    for round_number in range(24):
        victim = worker(path, 100_000)
        victims.append(victim)
        if round_number % 3 == 0:
            victims.append(worker(path, 0, "die-in-lock"))
        time.sleep(rng.uniform(0.05, 0.25))
        victim.send_signal(signal.SIGKILL)
        highest = max(highest, table.rows()[0].reservations)
        if round_number % 4 == 3:
            table.reclaim_dead_owners()  # what the balancer does once per report interval
        assert time.monotonic() < deadline

    # No process is blocked for good: every survivor finishes all its work.
    for process in survivors:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "OVERBOOKED" not in out
        lines = out.splitlines()
        assert lines[-1].startswith("done 599 ")
        assert any(line.endswith(" reserved") for line in lines)
    for process in victims:
        process.wait(10)
        assert process.returncode == -signal.SIGKILL

    row = table.rows()[0]
    assert row.reservations <= SLOTS
    assert highest <= SLOTS
    # The dead left reservations behind (the die-in-lock ones always do); the periodic
    # reclaim, run once per report interval, makes the count exact again.
    table.reclaim_dead_owners()
    assert table.rows()[0].reservations == 0
    table.join()
    held = [table.reserve(row.index, row.generation) for _ in range(SLOTS + 1)]
    assert held[:SLOTS] == [held[0]] * SLOTS
    assert held[0] is not None
    assert held[SLOTS] is None
    table.close()
