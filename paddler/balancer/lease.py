"""Which balancer worker serves the management API: the one that holds the lease.

Agents' reports, a thousand a second in a big fleet, cost least in one process. Spread
over every worker, each report woke a process whose caches another had just used:
bench/scale.py measured 257 µs of CPU per report with two workers on one core, against
190-208 µs with one. The lease is an flock on a file beside the slot table: the kernel
drops it when its holder dies, however it dies, and the other workers try to take it
every LEASE_RETRY seconds, so the management API is back within about that long after a
worker's crash. Meanwhile the listening socket, which the Gunicorn master owns, queues
what arrives.
"""

import fcntl
import os
from pathlib import Path

LEASE_RETRY = 0.1


class ManagementLease:
    def __init__(self, path: Path) -> None:
        # Opened after the fork, in the worker: an flock belongs to its open file.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.held = False

    def take(self) -> bool:
        """Whether this worker holds the lease (now, or already)."""
        if not self.held:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self.held = True
        return True

    def close(self) -> None:
        os.close(self._fd)  # and with it the lock
        self.held = False
