"""Which upstreams took each prompt prefix: a bounded table shared by every worker.

One file beside the slot table (``<slot table>.prefixes``), mapped by every balancer
process. A set-associative hash table: a key's set is ``key % sets``, each set holds
WAYS entries, one per (prefix, upstream): a prefix sent to two upstreams is held by
both (llama.cpp keeps prompts in host memory too, so both may still have it). A new
entry takes the way used longest ago (least recently used first, within its set).
Writers hold an flock on the file; readers do not: a torn entry can at worst make one
guess wrong, and every guess is checked against the slot table (the row's generation
and cache epoch) before it counts.

File layout, little-endian:
    offset 0   8s   magic b"PDLRPRFX"
    offset 8   u32  layout version
    offset 12  u32  sets
    then sets x WAYS entries of 24 bytes:
               u64 key (0: free), u16 row, u16 0, u32 row generation, u32 cache epoch,
               u32 last used (CLOCK_MONOTONIC seconds)
"""

import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"PDLRPRFX"
VERSION = 1
HEADER = struct.Struct("<8sII")
HEADER_SIZE = 64
WAYS = 4
ENTRY = struct.Struct("<QHxxIII")
SET = struct.Struct("<" + "QHxxIII" * WAYS)
DEFAULT_SETS = 16384  # 65,536 prefixes, 1.5 MB


class PrefixIndexError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Holder:
    """An upstream that took a prefix: its row as it was then, the prefix's length, and
    its rank among the request's holders (0: it holds the longest prefix found)."""

    row: int
    generation: int
    epoch: int
    length: int
    rank: int = 0


class PrefixIndex:
    def __init__(self, path: Path, fd: int, mapping: mmap.mmap, sets: int) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self.sets = sets

    @classmethod
    def create(cls, path: Path, sets: int = DEFAULT_SETS) -> "PrefixIndex":
        size = HEADER_SIZE + sets * SET.size
        partial = path.with_name(path.name + ".partial")
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, HEADER.pack(MAGIC, VERSION, sets), 0)
        finally:
            os.close(fd)
        partial.replace(path)  # a reader finds a whole file or none
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> "PrefixIndex":
        """Each process opens its own descriptor (an inherited one would share the lock)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as error:
            raise PrefixIndexError(f"cannot open the prefix index {path}: {error}") from error
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size)
        except (OSError, ValueError) as error:
            os.close(fd)
            raise PrefixIndexError(f"cannot map the prefix index {path}: {error}") from error
        magic, version, sets = HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or version != VERSION or len(mapping) < HEADER_SIZE + sets * SET.size:
            mapping.close()
            os.close(fd)
            raise PrefixIndexError(f"{path} is not a prefix index of version {VERSION}")
        return cls(path, fd, mapping, sets)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _set_offset(self, key: int) -> int:
        return HEADER_SIZE + (key % self.sets) * SET.size

    def find(self, key: int) -> list[tuple[int, int, int]]:
        """(row, generation, epoch) of every upstream that took this prefix."""
        fields = SET.unpack_from(self._map, self._set_offset(key))
        return [
            (fields[way + 1], fields[way + 2], fields[way + 3])
            for way in range(0, 5 * WAYS, 5)
            if fields[way] == key
        ]

    def holders(self, keys: list[tuple[int, int]], most: int = 4) -> list[Holder]:
        """The upstreams holding these prefixes (keys shortest first, as prefix_keys
        gives them): those of the longest prefix found first (rank 0), then those of
        shorter ones, at most ``most`` different rows."""
        found: list[Holder] = []
        rows: set[int] = set()
        rank = 0
        for key, length in reversed(keys):
            hits = [hit for hit in self.find(key) if hit[0] not in rows]
            for row, generation, epoch in hits:
                rows.add(row)
                found.append(Holder(row, generation, epoch, length, rank))
            if hits:
                rank += 1
                if len(found) >= most:
                    break
        return found[:most]

    def remember(self, keys: list[int], row: int, generation: int, epoch: int, now: float) -> None:
        """The upstream in ``row`` takes these prefixes now."""
        if not keys:
            return
        used = int(now)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for key in keys:
                offset = self._set_offset(key)
                fields = SET.unpack_from(self._map, offset)
                way = next(
                    (w for w in range(WAYS) if fields[5 * w] == key and fields[5 * w + 1] == row),
                    None,
                )
                if way is None:
                    # A free way, else the one used longest ago.
                    way = min(range(WAYS), key=lambda w: (fields[5 * w] != 0, fields[5 * w + 4]))
                ENTRY.pack_into(
                    self._map, offset + way * ENTRY.size, key, row, generation, epoch, used
                )
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
