"""Counters that every balancer process adds to and any of them can sum.

One file per process in a directory beside the slot table; each process writes only
its own (no lock on the request path, no contention between workers), and a scrape
reads them all and adds them up. A worker that dies leaves its counts behind: they are
history, and a Prometheus counter must never go down. Gunicorn's master folds a dead
worker's file into ``archive.counters`` under the directory's lock, which readers
share, so a scrape never counts a file twice or misses one.

File layout, little-endian:
    offset 0   8s   magic b"PDLRCNTR"
    offset 8   u32  layout version
    offset 12  u32  bytes used: entries end here (written after the entry it covers)
    then entries, each starting 8-aligned:
               u32 key length, u32 0, the key (UTF-8, zero-padded to 8), f64 value
The key is the sample's name and labels as Prometheus prints them. Values are written
whole and aligned, so a reader sees the old or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Final

MAGIC: Final = b"PDLRCNTR"
VERSION: Final = 1
HEADER: Final = struct.Struct("<8sII")
ENTRY: Final = struct.Struct("<II")
VALUE: Final = struct.Struct("<d")
INITIAL_SIZE: Final = 64 * 1024
ARCHIVE: Final = "archive.counters"
SUFFIX: Final = ".counters"
LOCK: Final = ".lock"


class CounterFile:
    """This process's counters, in its own file."""

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self._used = HEADER.size
        self._offsets: dict[str, int] = {}
        # The file as 8-byte floats: a value's index is its offset // 8 (values are
        # 8-aligned). The request path adds through it with no call per counter; it is
        # replaced when the file grows, so nobody may hold on to it across calls.
        self.doubles = memoryview(mapping).cast("d")

    @classmethod
    def create(cls, path: Path) -> CounterFile:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
        os.ftruncate(fd, INITIAL_SIZE)
        mapping = mmap.mmap(fd, INITIAL_SIZE)
        HEADER.pack_into(mapping, 0, MAGIC, VERSION, HEADER.size)
        return cls(path, fd, mapping)

    def add(self, key: str, amount: float = 1.0) -> None:
        index = self.index(key)  # first: a new key may replace ``doubles``
        self.doubles[index] += amount

    def index(self, key: str) -> int:
        """Where ``key``'s value is in ``doubles`` (added, at zero, if it is new)."""
        offset = self._offsets.get(key)
        if offset is None:
            offset = self._append(key)
        return offset // VALUE.size

    @property
    def values(self) -> dict[str, float]:
        """This process's counts."""
        doubles = self.doubles
        return {key: doubles[offset // VALUE.size] for key, offset in self._offsets.items()}

    def _append(self, key: str) -> int:
        encoded = key.encode()
        padded = -(-len(encoded) // 8) * 8
        start = self._used
        end = start + ENTRY.size + padded + VALUE.size
        if end > len(self._map):
            self.doubles.release()  # a mapping with a view on it cannot be resized
            self._map.resize(max(2 * len(self._map), end))  # grows the file too
            self.doubles = memoryview(self._map).cast("d")
        ENTRY.pack_into(self._map, start, len(encoded), 0)
        self._map[start + ENTRY.size : start + ENTRY.size + len(encoded)] = encoded
        offset = start + ENTRY.size + padded
        VALUE.pack_into(self._map, offset, 0.0)
        self._used = end
        # Readers stop at the used mark: the entry is whole before the mark covers it.
        struct.pack_into("<I", self._map, 12, end)
        self._offsets[key] = offset
        return offset

    def close(self) -> None:
        self.doubles.release()
        self._map.close()
        os.close(self._fd)


def read_file(path: Path) -> dict[str, float]:
    """One file's counters; empty if it is gone or not a counter file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    if len(data) < HEADER.size:
        return {}
    magic, version, used = HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        return {}
    values: dict[str, float] = {}
    offset = HEADER.size
    used = min(used, len(data))
    while offset + ENTRY.size <= used:
        length, _ = ENTRY.unpack_from(data, offset)
        key_at = offset + ENTRY.size
        value_at = key_at + -(-length // 8) * 8
        if value_at + VALUE.size > used:
            break
        key = data[key_at : key_at + length].decode()
        (values[key],) = VALUE.unpack_from(data, value_at)
        offset = value_at + VALUE.size
    return values


@contextlib.contextmanager
def _locked(directory: Path, operation: int) -> Iterator[None]:
    # Readers open it read-only: paddlerctl may run as a member of the balancer's group,
    # which can read the directory but not write in it. flock needs no write access.
    if operation == fcntl.LOCK_SH:
        fd = os.open(directory / LOCK, os.O_RDONLY)
    else:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def read_all(directory: Path) -> dict[str, float]:
    """Every process's counters, added up."""
    totals: dict[str, float] = {}
    with _locked(directory, fcntl.LOCK_SH):
        for path in directory.glob("*" + SUFFIX):
            for key, value in read_file(path).items():
                totals[key] = totals.get(key, 0.0) + value
    return totals


def fold(directory: Path, dead: Path) -> None:
    """Move a dead process's counts into the archive and remove its file (the master's
    job: the archive has that one writer)."""
    with _locked(directory, fcntl.LOCK_EX):
        counts = read_file(dead)
        if counts:
            archive_path = directory / ARCHIVE
            archive = read_file(archive_path)
            for key, value in counts.items():
                archive[key] = archive.get(key, 0.0) + value
            written = CounterFile.create(directory / ("archive.partial"))
            try:
                for key, value in archive.items():
                    written.add(key, value)
            finally:
                written.close()
            os.replace(written.path, archive_path)
        dead.unlink(missing_ok=True)


def prepare(directory: Path) -> None:
    """A fresh directory for a balancer that starts: counts begin at zero."""
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    for path in directory.iterdir():
        if path.name.endswith(SUFFIX) or path.name == "archive.partial":
            path.unlink()
    (directory / LOCK).touch(mode=0o640)
