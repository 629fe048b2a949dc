"""Passing children's output on, one prefixed line at a time."""

import os
import sys
import time
from typing import TextIO

_MAX_LINE = 16384


class LinePrefixer:
    """Reads what a child writes and prints it line by line under the child's name."""

    def __init__(
        self, name: str, fd: int, sink: TextIO | None = None, timestamps: bool = True
    ) -> None:
        self.name = name
        self.fd = fd
        self._sink = sink or sys.stderr
        self._timestamps = timestamps
        self._pending = b""
        self.last_line = ""
        self.closed = False

    def read(self) -> bool:
        """Drain what is readable now; False once the child closed its end."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                self.flush()
                return False
            self._pending += chunk
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                self._emit(line)
            while len(self._pending) > _MAX_LINE:
                self._emit(self._pending[:_MAX_LINE])
                self._pending = self._pending[_MAX_LINE:]

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = b""

    def close(self) -> None:
        if not self.closed:
            self.flush()
            os.close(self.fd)
            self.closed = True

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if line.strip():
            self.last_line = line.strip()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ") if self._timestamps else ""
        self._sink.write(f"{stamp}[{self.name}] {line}\n")
        self._sink.flush()
