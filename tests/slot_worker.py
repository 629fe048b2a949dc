"""A process that reserves and releases slots in a loop, for the slot table's stress test.

    python -m tests.slot_worker TABLE ITERATIONS MODE

MODE "normal" reserves, checks, holds briefly, releases. MODE "die-in-lock" takes
the table's lock, adds a reservation by hand and SIGKILLs itself while holding it.
Prints one line per completed iteration so the test can see progress.
"""

import os
import random
import signal
import sys
import time
from pathlib import Path

from paddler.slots import SlotTable


def main(path: str, iterations: int, mode: str) -> int:
    table = SlotTable.open(Path(path))
    table.join()
    row = table.rows()[0]
    if mode == "die-in-lock":
        # What reserve() does, then death before the lock is released.
        with table.locked():
            assert table._owner is not None
            if table._row(row.index).free_slots >= 1:
                table._u16[table._reservation_index(row.index, table._owner)] += 1
            os.kill(os.getpid(), signal.SIGKILL)
    rng = random.Random(os.getpid())
    for iteration in range(iterations):
        reservation = table.reserve(row.index, row.generation)
        if reservation is not None:
            seen = table.rows()[0]
            if seen.reservations > seen.slots_total:
                print(f"OVERBOOKED {seen.reservations} > {seen.slots_total}", flush=True)
                return 1
            time.sleep(rng.uniform(0, 0.002))
            table.release(reservation)
        time.sleep(rng.uniform(0, 0.004))
        print(f"done {iteration} {'reserved' if reservation else 'full'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
