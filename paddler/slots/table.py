"""The slot table (layout in paddler/slots/layout.py).

The management API writes agents' reports into it; every proxy worker reserves
and releases slots in it; paddlerctl reads it without taking its lock.
"""

import contextlib
import enum
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Final, cast

from paddler.slots.layout import (
    CACHE_EPOCH_OFFSET,
    CHOSEN_OFFSET,
    DEFAULT_MAX_OWNERS,
    DEFAULT_MAX_UPSTREAMS,
    DEFAULT_MAX_WAITERS,
    DRAINED_OFFSET,
    EJECTION,
    EJECTION_FIELDS,
    EJECTION_OFFSET,
    FREE_OFFSET,
    HEADER,
    HEADER_SIZE,
    HOST_CACHE_OFFSET,
    LAYOUT_VERSION,
    MAGIC,
    NEXT_TICKET_OFFSET,
    OWNER,
    OWNERS_OFFSET,
    PROCESSING_OFFSET,
    RELEASED_OFFSET,
    RESERVATIONS_OFFSET,
    RESERVED_AT_REPORT_OFFSET,
    RESERVED_OFFSET,
    ROW_META,
    ROW_NUMBERS,
    ROW_TEXTS,
    ROWS_USED_OFFSET,
    STRUCTURE_OFFSET,
    WAITER,
    WAITING_OFFSET,
    UpstreamState,
    row_size,
)
from paddler.slots.policy import SERVING, Policy


class SlotTableError(Exception):
    pass


@dataclass(slots=True)
class UpstreamReport:
    """One agent report, as the management API accepted it. Not frozen: a frozen
    dataclass sets each field through object.__setattr__, and a big fleet's reports
    arrive a thousand times a second."""

    agent_id: str
    name: str
    host: str
    port: int
    state: UpstreamState
    slots_total: int
    slots_idle: int
    slots_processing: int
    model: str
    build: str
    error: str
    sequence: int
    interval: float
    # Tokens of idle slots' prompts llama.cpp's host cache keeps (0: none, or unknown).
    host_cache_tokens: int = 0


@dataclass(init=False)
class UpstreamRow:
    """What the table says of one upstream at one moment. (Its __init__ written out:
    compiled, dataclass's generated one is Python code, run for every request.)"""

    index: int
    generation: int
    state: UpstreamState
    agent_id: str
    name: str
    host: str
    port: int
    model: str
    build: str
    error: str
    slots_total: int
    slots_idle: int
    slots_processing: int
    reserved_at_report: int
    reservations: int
    last_report: float
    first_report: float
    interval: float
    sequence: int
    ejected_until: float
    ejections: int
    drained: bool
    cache_epoch: int
    host_cache_tokens: int

    def __init__(
        self,
        index: int,
        generation: int,
        state: UpstreamState,
        agent_id: str,
        name: str,
        host: str,
        port: int,
        model: str,
        build: str,
        error: str,
        slots_total: int,
        slots_idle: int,
        slots_processing: int,
        reserved_at_report: int,
        reservations: int,
        last_report: float,
        first_report: float,
        interval: float,
        sequence: int,
        ejected_until: float = 0.0,
        ejections: int = 0,
        drained: bool = False,
        cache_epoch: int = 0,
        host_cache_tokens: int = 0,
    ) -> None:
        self.index = index
        self.generation = generation
        self.state = state
        self.agent_id = agent_id
        self.name = name
        self.host = host
        self.port = port
        self.model = model
        self.build = build
        self.error = error
        self.slots_total = slots_total
        self.slots_idle = slots_idle
        self.slots_processing = slots_processing
        self.reserved_at_report = reserved_at_report
        self.reservations = reservations
        self.last_report = last_report
        self.first_report = first_report
        self.interval = interval
        self.sequence = sequence
        self.ejected_until = ejected_until
        self.ejections = ejections
        self.drained = drained
        self.cache_epoch = cache_epoch
        self.host_cache_tokens = host_cache_tokens

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def age(self, now: float) -> float:
        return max(0.0, now - self.last_report)

    def is_stale(self, now: float, missed_reports: int) -> bool:
        return self.age(now) > missed_reports * self.interval

    @property
    def foreign_busy(self) -> int:
        """Busy slots that are not this balancer's: other clients', other balancers'.

        A report's busy count includes this balancer's own requests then in flight;
        those are counted exactly by the reservations instead, so only the rest is
        taken from the report.
        """
        return max(0, self.slots_processing - self.reserved_at_report)

    @property
    def free_slots(self) -> int:
        return max(0, self.slots_total - self.foreign_busy - self.reservations)


class Applied(enum.Enum):
    NEW = "new"  # a row for an upstream not in the table before
    UPDATED = "updated"
    IGNORED = "ignored"  # a duplicate, or older than a report already applied


class Reservation:
    """One slot held by this process. (A plain class, not a NamedTuple: one is made for
    every request, and compiled (docs/architecture.md) a native class costs a fraction
    of a tuple subclass, whose constructor is Python code.)"""

    __slots__ = ("generation", "row")

    def __init__(self, row: int, generation: int) -> None:
        self.row = row
        self.generation = generation

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reservation):
            return NotImplemented
        return self.row == other.row and self.generation == other.generation

    def __hash__(self) -> int:
        return hash((self.row, self.generation))

    def __repr__(self) -> str:
        return f"Reservation(row={self.row}, generation={self.generation})"


class _Flock:
    """The table's lock held for a with-block (a plain class: cheaper per request than a
    generator-based context manager)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


_STATES: Final = tuple(UpstreamState(value) for value in range(max(UpstreamState) + 1))
_FREE: Final = int(UpstreamState.FREE)  # a plain int: compared on the hot path


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _bytes(text: str, size: int) -> bytes:
    data = text.encode("utf-8")[:size]
    # Never cut a character in half.
    return data.decode("utf-8", errors="ignore").encode("utf-8")


def process_start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


class SlotTable:
    def __init__(self, path: Path, fd: int, writable: bool) -> None:
        self.path = path
        self._fd = fd
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            os.close(fd)
            raise SlotTableError(f"{path} is not a Paddler slot table (only {size} bytes)")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self._map = mmap.mmap(fd, size, access=access)
        magic, version = HEADER.unpack_from(self._map, 0)[:2]
        if magic != MAGIC:
            self._close_map()
            raise SlotTableError(f"{path} is not a Paddler slot table")
        if version != LAYOUT_VERSION:
            self._close_map()
            raise SlotTableError(
                f"{path} has slot table layout version {version}, but this Paddler reads "
                f"version {LAYOUT_VERSION}: run paddlerctl from the same release as the balancer"
            )
        (_, _, max_upstreams, max_owners, size_of_row, created, creator, max_waiters, *_) = (
            HEADER.unpack_from(self._map, 0)
        )
        self.max_upstreams: int = max_upstreams
        self.max_waiters: int = max_waiters
        self._waiters_offset: int = HEADER_SIZE + max_upstreams * size_of_row
        self.max_owners: int = max_owners
        self.row_size: int = size_of_row
        self.created: float = created
        self.creator_pid: int = creator
        self._u16 = memoryview(self._map).cast("H")
        self._u32 = memoryview(self._map).cast("I")
        self._i16 = memoryview(self._map).cast("h")
        self._f64 = memoryview(self._map).cast("d")
        self._texts: dict[int, tuple[int, tuple[str, ...]]] = {}
        # What acquire() remembers between requests, valid while the structure version
        # stays: per policy, the rows that match it structurally, grouped best state
        # first; and rows found stale or ejected, skipped until they report or return.
        self._structure_seen = -1
        self._groups: dict[object, list[list[int]]] = {}
        self._unfit: dict[int, tuple[float, float]] = {}
        self._agent_rows: dict[str, int] = {}
        # A report's texts as stored, packed once: they rarely change between reports.
        self._packed_texts: dict[tuple[str, ...], bytes] = {}
        self._owner: int | None = None
        self._lock = _Flock(fd)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        max_upstreams: int = DEFAULT_MAX_UPSTREAMS,
        max_owners: int = DEFAULT_MAX_OWNERS,
        max_waiters: int = DEFAULT_MAX_WAITERS,
    ) -> "SlotTable":
        """A new, empty table at ``path``, replacing any old one atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        size_of_row = row_size(max_owners)
        header = HEADER.pack(
            MAGIC,
            LAYOUT_VERSION,
            max_upstreams,
            max_owners,
            size_of_row,
            time.time(),
            os.getpid(),
            max_waiters,
            1,
            0,
            0,
        )
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        with open(partial, "wb") as new:
            new.write(header.ljust(HEADER_SIZE, b"\0"))
            new.truncate(HEADER_SIZE + max_upstreams * size_of_row + max_waiters * WAITER.size)
        partial.chmod(0o640)
        partial.rename(path)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> "SlotTable":
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SlotTableError(f"no slot table at {path}: is the balancer running?") from None
        except PermissionError:
            raise SlotTableError(f"no permission to read the slot table {path}") from None
        return cls(path, fd, writable=not readonly)

    def close(self) -> None:
        self._close_map()

    def _close_map(self) -> None:
        for view in ("_u16", "_u32", "_i16", "_f64"):
            if hasattr(self, view):
                getattr(self, view).release()
        if hasattr(self, "_map"):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -- locking and rows ------------------------------------------------------------------

    def locked(self) -> "_Flock":
        return self._lock

    def _offset(self, row: int) -> int:
        return HEADER_SIZE + row * self.row_size

    def _reservation_index(self, row: int, owner: int) -> int:
        return (self._offset(row) + RESERVATIONS_OFFSET) // 2 + owner

    def _reserved_at_report(self, row: int) -> int:
        """Ours among the busy slots a report counts: those in flight, and those that
        ended since the last report, which the agent may have seen still running (the
        report was measured before it reached us). Counting an ended one too many only
        hides another client's request for one report interval; counting it too few
        would make a free slot look busy for one interval."""
        released = (self._offset(row) + RELEASED_OFFSET) // 2
        recent = int(self._u16[released])
        self._u16[released] = 0
        return self._reservations(row) + recent

    def _reservations(self, row: int) -> int:
        return int(self._u16[(self._offset(row) + RESERVED_OFFSET) // 2])

    def _recount(self, row: int) -> None:
        """Recompute a row's reservation sum and free slots from what they derive from."""
        offset = self._offset(row)
        start = (offset + RESERVATIONS_OFFSET) // 2
        reserved = sum(self._u16[start : start + self.max_owners])
        _, _, _, _, total, _, processing, reserved_at_report, *_ = ROW_NUMBERS.unpack_from(
            self._map, offset
        )
        free = total - max(0, processing - reserved_at_report) - reserved
        self._u16[(offset + RESERVED_OFFSET) // 2] = reserved
        self._i16[(offset + FREE_OFFSET) // 2] = max(-32768, min(32767, free))

    def _count_reservation(self, row: int, owner: int, change: int) -> None:
        """One reservation more (1) or fewer (-1) of ``owner`` on ``row``."""
        # Offsets written out (rows and fields are 2-aligned): it runs twice a request.
        half = (HEADER_SIZE + row * self.row_size) // 2
        u16 = self._u16
        u16[half + RESERVATIONS_OFFSET // 2 + owner] += change
        u16[half + RESERVED_OFFSET // 2] += change
        self._i16[half + FREE_OFFSET // 2] -= change

    def _structure(self) -> int:
        return int(self._u32[STRUCTURE_OFFSET // 4])

    def structure_version(self) -> int:
        """Moves whenever a row gets another state, model or generation, or is freed:
        what a process derives from those alone stays true while it stays."""
        return self._structure()

    def _restructured(self) -> None:
        self._u32[STRUCTURE_OFFSET // 4] = (self._u32[STRUCTURE_OFFSET // 4] + 1) & 0xFFFFFFFF

    def _row(self, row: int) -> UpstreamRow:
        offset = self._offset(row)
        (
            _,
            state,
            generation,
            port,
            total,
            idle,
            processing,
            reserved_at_report,
            last_report,
            interval,
            sequence,
            first_report,
            host_cache_tokens,
        ) = ROW_NUMBERS.unpack_from(self._map, offset)
        # The texts change only with a report, which moves the row's write counter:
        # decoded once per report, not once per request.
        version = self._u32[offset // 4]
        cached = self._texts.get(row)
        if cached is None or cached[0] != version:
            raw = ROW_TEXTS.unpack_from(self._map, offset + ROW_NUMBERS.size)
            cached = (version, tuple(_text(field) for field in raw))
            self._texts[row] = cached
        agent_id, name, host, model, build, error = cached[1]
        ejected_until, ejections = EJECTION.unpack_from(self._map, offset + EJECTION_OFFSET)
        return UpstreamRow(
            row,
            generation,
            _STATES[state],
            agent_id,
            name,
            host,
            port,
            model,
            build,
            error,
            total,
            idle,
            processing,
            reserved_at_report,
            int(self._u16[(offset + RESERVED_OFFSET) // 2]),
            last_report,
            first_report,
            interval,
            sequence,
            ejected_until,
            ejections,
            bool(self._map[offset + DRAINED_OFFSET]),
            int(self._u32[(offset + CACHE_EPOCH_OFFSET) // 4]),
            host_cache_tokens,
        )

    def _rows_used(self) -> int:
        return int(self._u32[ROWS_USED_OFFSET // 4])

    def _used_rows(self) -> list[UpstreamRow]:
        rows = []
        for index in range(self._rows_used()):
            if self._map[self._offset(index) + 4] != UpstreamState.FREE:
                rows.append(self._row(index))
        return rows

    def rows(self) -> list[UpstreamRow]:
        """Every upstream, read without the lock (seqlock: a row being rewritten is re-read)."""
        rows = []
        for index in range(self._rows_used()):
            offset = self._offset(index)
            for _ in range(1000):
                before = self._u32[offset // 4]
                if before % 2 == 0:
                    row = self._row(index) if self._map[offset + 4] else None
                    if self._u32[offset // 4] == before:
                        break
                time.sleep(0)
            else:
                raise SlotTableError(f"row {index} of {self.path} stays mid-write")
            if row is not None:
                rows.append(row)
        return rows

    def _write(
        self,
        row: int,
        state: UpstreamState,
        generation: int,
        report: UpstreamReport | None,
        reserved: int,
        first_report: float,
        last_report: float,
    ) -> None:
        offset = self._offset(row)
        model_at = offset + ROW_NUMBERS.size + 32 + 64 + 128
        before = (self._map[offset + 4], self._u32[(offset + 8) // 4])
        model_before = bytes(self._map[model_at : model_at + 128])
        sequence_index = offset // 4
        seqlock = self._u32[sequence_index]
        # Odd here means a writer died mid-write (the lock is ours now): start from even,
        # or the row would read as being written forever.
        seqlock += seqlock & 1
        self._u32[sequence_index] = seqlock + 1  # odd: readers wait
        if report is None:
            fields = ROW_META.pack(
                seqlock + 1,
                state,
                generation,
                0,
                0,
                0,
                0,
                0,
                0.0,
                0.0,
                0,
                0.0,
                0,
                b"",
                b"",
                b"",
                b"",
                b"",
                b"",
            )
        else:
            fields = ROW_NUMBERS.pack(
                seqlock + 1,
                state,
                generation,
                report.port,
                report.slots_total,
                report.slots_idle,
                report.slots_processing,
                reserved,
                last_report,
                report.interval,
                report.sequence,
                first_report,
                report.host_cache_tokens,
            ) + self._texts_of(report)
        # By slice: one copy, never a zeroed row in between (struct.pack_into clears first).
        self._map[offset + 4 : offset + ROW_META.size] = fields[4:]
        self._u32[sequence_index] = seqlock + 2
        self._recount(row)
        if self._map[offset + 4] != before[0] and state is not UpstreamState.READY:
            # Unreachable, loading, asleep...: whatever it had cached may be gone.
            self._bump_cache_epoch(row)
        after = (self._map[offset + 4], self._u32[(offset + 8) // 4])
        if after != before or self._map[model_at : model_at + 128] != model_before:
            self._restructured()

    def _texts_of(self, report: UpstreamReport) -> bytes:
        key = (report.agent_id, report.name, report.host, report.model, report.build, report.error)
        packed = self._packed_texts.get(key)
        if packed is None:
            if len(self._packed_texts) > 4 * self.max_upstreams:
                self._packed_texts.clear()  # agents come and go: a bound, not a policy
            packed = self._packed_texts[key] = ROW_TEXTS.pack(
                _bytes(report.agent_id, 32),
                _bytes(report.name, 64),
                _bytes(report.host, 128),
                _bytes(report.model, 128),
                _bytes(report.build, 64),
                _bytes(report.error, 156),
            )
        return packed

    def _free(self, row: UpstreamRow) -> None:
        self._write(row.index, UpstreamState.FREE, row.generation, None, 0, 0.0, 0.0)
        self._set_ejection(row.index, 0.0, 0)
        self._map[self._offset(row.index) + DRAINED_OFFSET] = 0
        self._u16[(self._offset(row.index) + RELEASED_OFFSET) // 2] = 0
        self._f64[(self._offset(row.index) + CHOSEN_OFFSET) // 8] = 0.0
        start = (self._offset(row.index) + RESERVATIONS_OFFSET) // 2
        for owner in range(self.max_owners):
            self._u16[start + owner] = 0
        self._recount(row.index)

    # -- what the management API does -------------------------------------------------------

    def apply_report(self, report: UpstreamReport, now: float) -> Applied:
        """Store a report, unless it is a duplicate or older than one already applied."""
        with self.locked():
            found = self._find_agent(report.agent_id)
            if found is not None:
                # The common case, a thousand times a second in a big fleet: only the
                # numbers it needs from the row, not the whole row decoded.
                numbers = ROW_NUMBERS.unpack_from(self._map, self._offset(found))
                if report.sequence <= numbers[10]:
                    return Applied.IGNORED
                self._write(
                    found,
                    report.state,
                    numbers[2],
                    report,
                    self._reserved_at_report(found),
                    numbers[11],
                    now,
                )
                return Applied.UPDATED
            # A new agent run for an upstream already known takes its row over, with the
            # reservations in flight on it.
            target = next(
                (r for r in self._used_rows() if (r.host, r.port) == (report.host, report.port)),
                None,
            )
            if target is None:
                index = self._first_free_row()
                generation = self._row(index).generation + 1
                first = now
            else:
                index, generation, first = target.index, target.generation, target.first_report
            self._write(
                index,
                report.state,
                generation,
                report,
                self._reserved_at_report(index),
                first,
                now,
            )
            self._agent_rows[report.agent_id] = index
            return Applied.NEW if target is None else Applied.UPDATED

    def _find_agent(self, agent_id: str) -> int | None:
        """The row of this agent's upstream, if it has one: remembered per process and
        checked against the row, so that a report costs the same among 1,000 upstreams
        as among 2; a scan of the agent ids only when the row moved or is new."""
        wanted = _bytes(agent_id, 32).ljust(32, b"\0")
        start = ROW_NUMBERS.size
        remembered = self._agent_rows.get(agent_id)
        if remembered is not None:
            offset = self._offset(remembered)
            if self._map[offset + 4] and self._map[offset + start : offset + start + 32] == wanted:
                return remembered
        for index in range(self._rows_used()):
            offset = self._offset(index)
            if self._map[offset + 4] and self._map[offset + start : offset + start + 32] == wanted:
                if len(self._agent_rows) > 4 * self.max_upstreams:
                    self._agent_rows.clear()  # agents come and go: a bound, not a policy
                self._agent_rows[agent_id] = index
                return index
        return None

    def _first_free_row(self) -> int:
        for index in range(self.max_upstreams):
            if self._map[self._offset(index) + 4] == UpstreamState.FREE:
                if index >= self._rows_used():
                    struct.pack_into("<I", self._map, ROWS_USED_OFFSET, index + 1)
                return index
        raise SlotTableError(f"the slot table is full ({self.max_upstreams} upstreams)")

    def remove_agent(self, agent_id: str) -> UpstreamRow | None:
        """Take an agent's upstream out of rotation at once (its agent stopped cleanly)."""
        with self.locked():
            row = next((r for r in self._used_rows() if r.agent_id == agent_id), None)
            if row is None:
                return None
            if row.reservations:
                report = UpstreamReport(
                    row.agent_id,
                    row.name,
                    row.host,
                    row.port,
                    UpstreamState.REMOVED,
                    row.slots_total,
                    row.slots_idle,
                    row.slots_processing,
                    row.model,
                    row.build,
                    "its agent stopped",
                    row.sequence,
                    row.interval,
                )
                self._write(
                    row.index,
                    UpstreamState.REMOVED,
                    row.generation,
                    report,
                    row.reserved_at_report,
                    row.first_report,
                    row.last_report,
                )
            else:
                self._free(row)
            return row

    def expire(self, now: float, forget_after: float, missed_reports: int = 1) -> list[UpstreamRow]:
        """Forget drained removed upstreams, and those silent for ``forget_after`` seconds.

        Never one that is not stale yet (silent for ``missed_reports`` of the intervals
        its agent declared): an agent that reports every two minutes is not forgotten
        between two reports because ``forget_after`` is one minute. Its row would come
        back with the next report, but the requests sent meanwhile would find a fleet
        without it, and wait, or be refused.
        """
        # Every worker runs this twice a second: with a thousand upstreams, reading each
        # whole row under the lock cost more than the agents' reports. Candidates are
        # picked from strided reads, and only they are read whole, under the lock.
        used = self._rows_used()
        end = HEADER_SIZE + used * self.row_size
        step = self.row_size // 8
        states = self._map[HEADER_SIZE + 4 : end : self.row_size]
        # typeshed says list[int]: a memoryview of doubles gives floats.
        reported = cast(
            "list[float]", self._f64[(HEADER_SIZE + 24) // 8 : end // 8 : step].tolist()
        )
        intervals = cast(
            "list[float]", self._f64[(HEADER_SIZE + 32) // 8 : end // 8 : step].tolist()
        )
        candidates = [
            index
            for index, (state, last, interval) in enumerate(
                zip(states, reported, intervals, strict=True)
            )
            if state != UpstreamState.FREE
            and (
                state == UpstreamState.REMOVED
                or now - last > max(forget_after, missed_reports * interval)
            )
        ]
        forgotten: list[UpstreamRow] = []
        if not candidates:
            return forgotten
        with self.locked():
            for index in candidates:
                if index >= self._rows_used():
                    continue
                row = self._row(index)
                drained = row.state is UpstreamState.REMOVED and row.reservations == 0
                silent = row.age(now) > forget_after and row.is_stale(now, missed_reports)
                if row.state is not UpstreamState.FREE and (drained or silent):
                    self._free(row)
                    forgotten.append(row)
        return forgotten

    # -- what proxy workers do -------------------------------------------------------------

    def join(self) -> None:
        """Register this process as one that holds reservations (once, after fork)."""
        pid = os.getpid()
        started = process_start_time(pid)
        with self.locked():
            free = None
            for index in range(self.max_owners):
                owner_pid, _, owner_started = OWNER.unpack_from(
                    self._map, self._owner_offset(index)
                )
                if owner_pid == pid and owner_started == started:
                    self._owner = index
                    return
                if free is None and (owner_pid == 0 or not _alive(owner_pid, owner_started)):
                    free = index
            if free is None:
                raise SlotTableError(f"more than {self.max_owners} processes use {self.path}")
            self._clear_owner(free)
            self._drop_waiters(free)  # a dead owner's tickets would block the line for good
            self._map[self._owner_offset(free) : self._owner_offset(free) + OWNER.size] = (
                OWNER.pack(pid, 0, started or 0)
            )
            self._owner = free

    def _owner_offset(self, index: int) -> int:
        return OWNERS_OFFSET + index * OWNER.size

    def _clear_owner(self, index: int) -> None:
        for row in range(self.max_upstreams):
            if self._u16[self._reservation_index(row, index)]:
                self._u16[self._reservation_index(row, index)] = 0
                self._recount(row)
        offset = self._owner_offset(index)
        self._map[offset : offset + OWNER.size] = bytes(OWNER.size)

    def reclaim_dead_owners(self, dead_pid: int | None = None) -> int:
        """Release every reservation of processes that died; how many processes that was."""
        reclaimed = 0
        with self.locked():
            for index in range(self.max_owners):
                pid, _, started = OWNER.unpack_from(self._map, self._owner_offset(index))
                if pid and (pid == dead_pid or not _alive(pid, started)):
                    self._clear_owner(index)
                    self._drop_waiters(index)
                    reclaimed += 1
        return reclaimed

    def reserve(self, row: int, generation: int) -> Reservation | None:
        """Take one slot of this ready upstream if it has one free, or None."""
        if self._owner is None:
            raise SlotTableError("join() the table before reserving")
        with self.locked():
            offset = self._offset(row)
            free = self._i16[(offset + FREE_OFFSET) // 2]
            if (
                self._u32[(offset + 8) // 4] != generation
                or self._map[offset + 4] != UpstreamState.READY
                or free <= 0
                or (self._waiting() and free <= self._ahead(0, None))
            ):
                return None
            self._count_reservation(row, self._owner, 1)
            return Reservation(row, generation)

    def release(self, reservation: Reservation) -> None:
        if self._owner is None:
            raise SlotTableError("join() the table before releasing")
        offset = HEADER_SIZE + reservation.row * self.row_size
        half = offset // 2
        u16 = self._u16
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # as in acquire()
        try:
            if self._u32[offset // 4 + 2] != reservation.generation:
                return  # the upstream was forgotten meanwhile; its counters were reset
            if u16[half + RESERVATIONS_OFFSET // 2 + self._owner] > 0:
                self._count_reservation(reservation.row, self._owner, -1)
                released = half + RELEASED_OFFSET // 2
                u16[released] = min(0xFFFF, u16[released] + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- choosing an upstream, and waiting in line for one ---------------------------------

    def acquire(
        self, model_key: int, policy: Policy, ticket: int | None = None
    ) -> tuple[Reservation, UpstreamRow] | None:
        """Reserve a slot on the upstream with the most free slots that ``policy`` allows,
        first in, first out.

        A request takes a slot only if more are free on those upstreams than requests of
        a compatible model wait ahead of it (all waiting ones, for a request not in line
        yet): a newcomer never jumps the queue, and a waiter at the back is not held up
        by one at the front that wants another model.

        Fast with many upstreams: each row's free slots are one number kept current by
        every writer, read for all rows at once; the rows a policy allows by state and
        model are remembered until the table's structure changes; time-dependent checks
        (staleness, ejection) run only on the row about to be chosen.
        """
        owner = self._owner
        if owner is None:
            raise SlotTableError("join() the table before reserving")
        # The lock taken and dropped by hand, and a policy without preferences sent
        # straight to the least busy row: this runs for every request.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if policy.prefer:
                chosen = self._choose(policy, model_key, ticket)
            else:
                chosen = self._least_busy(policy, model_key, ticket, self._groups_for(policy))
            if chosen is None:
                return None
            self._count_reservation(chosen, owner, 1)
            self._f64[(HEADER_SIZE + chosen * self.row_size + CHOSEN_OFFSET) // 8] = policy.now
            if ticket is not None:
                self._remove_waiter(ticket)
            row = self._row(chosen)
            return Reservation(chosen, row.generation), row
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _choose(self, policy: Policy, model_key: int, ticket: int | None) -> int | None:
        """The least busy row, or one of the policy's preferred rows instead."""
        groups = self._groups_for(policy)
        best = self._least_busy(policy, model_key, ticket, groups)
        if best is None or not policy.prefer:
            return best
        start = (HEADER_SIZE + FREE_OFFSET) // 2
        step = self.row_size // 2
        used = self._rows_used()
        best_free = self._i16[start + best * step]
        # (rank, -free, last chosen, row): the least wins.
        chosen: tuple[int, int, float, int] | None = None
        prefer, ranks = policy.prefer, policy.ranks
        chosen_at = (HEADER_SIZE + CHOSEN_OFFSET) // 8
        chosen_step = self.row_size // 8
        # By position, not zip(..., strict=True): compiled, a call with a keyword
        # argument costs more than the rest of the loop.
        for position in range(len(prefer)):
            row, rank = prefer[position], ranks[position]
            if chosen is not None and rank > chosen[0]:
                break  # a holder of a longer prefix was found: shorter ones do not count
            if row >= used:
                continue
            free = self._i16[start + row * step]
            if free <= 0 or free + policy.imbalance <= best_free:
                continue
            if row != best:
                for indices in groups:
                    if row in indices:
                        break
                else:
                    continue  # not one the policy allows
                if not self._fresh(row, policy):
                    continue
            candidate = (rank, -free, self._f64[chosen_at + row * chosen_step], row)
            chosen = candidate if chosen is None else min(chosen, candidate)
        return best if chosen is None else chosen[3]

    def _least_busy(
        self,
        policy: Policy,
        model_key: int,
        ticket: int | None,
        groups: list[list[int]],
    ) -> int | None:
        used = int(self._u32[ROWS_USED_OFFSET // 4])
        if not used:
            return None
        start = (HEADER_SIZE + FREE_OFFSET) // 2
        step = self.row_size // 2
        frees = self._i16[start : start + used * step : step].tolist()
        if self._unfit:
            self._forget_recovered(policy.now)
        waiting = self._u32[WAITING_OFFSET // 4]
        available = 0
        best: int | None = None
        for indices in groups:
            # Every row in use (one model, none excluded) and none unfit: as read.
            same = len(indices) == used and not self._unfit
            values = frees if same else self._free_of(indices, frees)
            while best is None:
                most = max(values) if values else 0  # (no keyword argument: see _choose)
                if most <= 0:
                    break
                if policy.spread:
                    position = self._least_recently_chosen(indices, values, most)
                else:
                    position = values.index(most)
                if self._fresh(indices[position], policy):
                    best = indices[position]
                else:
                    values[position] = 0
            if not waiting and best is not None:
                return best
            if waiting:
                # Only with a line: how many slots the fresh ones of this group have.
                available += sum(
                    value
                    for value, index in zip(values, indices, strict=True)
                    if value > 0 and (index == best or self._fresh(index, policy))
                )
        if best is None or (waiting and available <= self._ahead(model_key, ticket)):
            return None
        return best

    def _least_recently_chosen(self, indices: list[int], values: list[int], most: int) -> int:
        """Among the rows with ``most`` free slots, the position of the one that took a
        request longest ago, in any process. Its requests are the furthest along: past
        their prefill, more likely, which a new prompt's prefill would share the
        server's compute with. (Taking tied rows in turn per process, as before, put two
        prefills on one server about as often as not: bench W3.)"""
        start = (HEADER_SIZE + CHOSEN_OFFSET) // 8
        step = self.row_size // 8
        f64 = self._f64
        position = -1
        oldest = 0.0
        for at in range(len(values)):
            if values[at] == most:
                chosen_at = f64[start + indices[at] * step]
                if position < 0 or chosen_at < oldest:
                    position = at
                    oldest = chosen_at
        return position

    def _groups_for(self, policy: Policy) -> list[list[int]]:
        structure = self._u32[STRUCTURE_OFFSET // 4]
        if structure != self._structure_seen:
            self._structure_seen = structure
            self._groups.clear()
            self._unfit.clear()
        groups = self._groups.get(policy.key)
        if groups is None:
            if len(self._groups) > 256:
                self._groups.clear()  # retries' exclusions make many keys: a bound
            groups = self._groups[policy.key] = self._match(policy)
        return groups

    def _free_of(self, indices: list[int], frees: list[int]) -> list[int]:
        """The free slots of these rows, 0 for rows known to be stale or ejected."""
        if len(indices) == len(frees):
            values = frees  # every row in use (one model, none excluded): as read
        else:
            picked = itemgetter(*indices)(frees)
            values = list(picked) if len(indices) > 1 else [picked]
        if self._unfit:
            for position, index in enumerate(indices):
                if index in self._unfit:
                    values[position] = 0
        return values

    def _match(self, policy: Policy) -> list[list[int]]:
        """The rows ``policy`` allows by state, model and exclusion, best state first."""
        by_rank: dict[int, list[int]] = {}
        for row in self._used_rows():
            if policy.matches(row.state, row.model, row.index, row.generation, row.drained):
                by_rank.setdefault(SERVING[row.state], []).append(row.index)
        return [by_rank[rank] for rank in sorted(by_rank, reverse=True)]

    def _fresh(self, row: int, policy: Policy) -> bool:
        offset = HEADER_SIZE + row * self.row_size
        last_report = self._f64[(offset + 24) // 8]
        interval = self._f64[(offset + 32) // 8]
        ejected_until = self._f64[(offset + EJECTION_OFFSET) // 8]
        if policy.fresh(last_report, interval, ejected_until):
            return True
        self._unfit[row] = (last_report, ejected_until)
        return False

    def _forget_recovered(self, now: float) -> None:
        """Rows skipped as stale or ejected come back when they report or are let back."""
        if not self._unfit:
            return
        for row, (last_report, ejected_until) in list(self._unfit.items()):
            offset = self._offset(row)
            reported = self._f64[(offset + 24) // 8] != last_report
            let_back = self._f64[(offset + EJECTION_OFFSET) // 8] != ejected_until
            if reported or let_back or (ejected_until and ejected_until <= now):
                del self._unfit[row]

    def enqueue(self, model_key: int, now: float) -> int | None:
        """A ticket in the waiting line, or None when the line is full."""
        if self._owner is None:
            raise SlotTableError("join() the table before waiting")
        with self.locked():
            for entry in range(self.max_waiters):
                offset = self._waiter_offset(entry)
                if WAITER.unpack_from(self._map, offset)[0] == 0:
                    ticket: int = struct.unpack_from("<Q", self._map, NEXT_TICKET_OFFSET)[0]
                    struct.pack_into("<Q", self._map, NEXT_TICKET_OFFSET, ticket + 1)
                    self._map[offset : offset + WAITER.size] = WAITER.pack(
                        ticket, self._owner, model_key, now
                    )
                    self._set_waiting(self._waiting() + 1)
                    return ticket
        return None

    def leave(self, ticket: int) -> None:
        """Step out of the waiting line (timed out, or the client left)."""
        with self.locked():
            self._remove_waiter(ticket)

    def waiting(self) -> int:
        return self._waiting()

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting request has waited; 0 when none waits."""
        if not self._waiting():
            return 0.0
        queued = [at for _, _, _, _, at in self._waiters()]
        return max(0.0, now - min(queued)) if queued else 0.0

    def _waiter_offset(self, entry: int) -> int:
        return self._waiters_offset + entry * WAITER.size

    def _waiting(self) -> int:
        return int(self._u32[WAITING_OFFSET // 4])

    def _set_waiting(self, count: int) -> None:
        struct.pack_into("<I", self._map, WAITING_OFFSET, max(0, count))

    def _waiters(self) -> Iterator[tuple[int, int, int, int, float]]:
        """(entry, ticket, owner, model key, queued at) of every waiter."""
        for entry in range(self.max_waiters):
            ticket, owner, key, queued = WAITER.unpack_from(self._map, self._waiter_offset(entry))
            if ticket:
                yield entry, ticket, owner, key, queued

    def _ahead(self, model_key: int, ticket: int | None) -> int:
        return sum(
            1
            for _, other, _, key, _ in self._waiters()
            if (ticket is None or other < ticket) and (model_key == 0 or key in (0, model_key))
        )

    def _remove_waiter(self, ticket: int) -> None:
        for entry, other, _, _, _ in self._waiters():
            if other == ticket:
                offset = self._waiter_offset(entry)
                self._map[offset : offset + WAITER.size] = bytes(WAITER.size)
                self._set_waiting(self._waiting() - 1)
                return

    def _drop_waiters(self, owner: int) -> None:
        for entry, _, other_owner, _, _ in list(self._waiters()):
            if other_owner == owner:
                offset = self._waiter_offset(entry)
                self._map[offset : offset + WAITER.size] = bytes(WAITER.size)
        self._set_waiting(sum(1 for _ in self._waiters()))

    # -- ejection --------------------------------------------------------------------------

    def _set_ejection(self, row: int, until: float, ejections: int) -> None:
        offset = self._offset(row) + EJECTION_OFFSET
        EJECTION_FIELDS.pack_into(self._map, offset, until, ejections)

    def eject(
        self,
        row: int,
        generation: int,
        now: float,
        initial: float,
        maximum: float,
        keep: Callable[[list[UpstreamRow], UpstreamRow], bool],
    ) -> float | None:
        """Take a failing upstream out of rotation for a while; the seconds, or None.

        The while doubles with each ejection in a row. ``keep`` says whether the
        upstream must stay (it is the last one able to serve its model).
        """
        with self.locked():
            current = self._row(row)
            if current.generation != generation or current.ejected_until > now:
                return None
            if keep(self._used_rows(), current):
                return None
            seconds = min(maximum, initial * 2.0**current.ejections)
            self._set_ejection(row, now + seconds, min(current.ejections + 1, 30))
            return seconds

    def forgive(self, row: int, generation: int) -> None:
        """A success: the next ejection, if any, starts from the shortest again."""
        with self.locked():
            current = self._row(row)
            if current.generation == generation and current.ejections:
                self._set_ejection(row, 0.0, 0)

    def forget_cache(self, row: int, generation: int) -> None:
        """The upstream's cache is not what the balancer thought (its guesses missed):
        every prefix remembered for it is void from now on."""
        with self.locked():
            if self._u32[(self._offset(row) + 8) // 4] == generation:
                self._bump_cache_epoch(row)

    def unchanged_since(self, row: int, generation: int, epoch: int) -> bool:
        """Whether ``row`` is in use by the same upstream (``generation``) with the same
        cache (``epoch``) as when a guess about it was remembered; read without decoding
        the row or taking the lock."""
        if row >= self._u32[ROWS_USED_OFFSET // 4]:
            return False
        offset = HEADER_SIZE + row * self.row_size
        return (
            self._map[offset + 4] != _FREE
            and self._u32[(offset + 8) // 4] == generation
            and self._u32[(offset + CACHE_EPOCH_OFFSET) // 4] == epoch
        )

    def foreign_busy(self, row: int) -> int:
        """``row``'s busy slots that are not this balancer's, as UpstreamRow.foreign_busy
        has them, read without decoding the row or taking the lock."""
        if row >= self._u32[ROWS_USED_OFFSET // 4]:
            return 0
        offset = HEADER_SIZE + row * self.row_size
        processing = int(self._u16[(offset + PROCESSING_OFFSET) // 2])
        return max(0, processing - int(self._u16[(offset + RESERVED_AT_REPORT_OFFSET) // 2]))

    def host_cache_tokens(self, row: int) -> int:
        """Tokens of idle slots' prompts the host cache of ``row``'s upstream keeps, as
        its agent reported them (0: none, or unknown); read without the lock."""
        if row >= self._u32[ROWS_USED_OFFSET // 4]:
            return 0
        return int(self._u32[(HEADER_SIZE + row * self.row_size + HOST_CACHE_OFFSET) // 4])

    def cache_epochs(self) -> list[int]:
        """Every row's cache epoch, in one strided read (row index -> epoch)."""
        used = self._rows_used()
        start = (HEADER_SIZE + CACHE_EPOCH_OFFSET) // 4
        step = self.row_size // 4
        epochs: list[int] = self._u32[start : start + used * step : step].tolist()
        return epochs

    def _bump_cache_epoch(self, row: int) -> None:
        index = (self._offset(row) + CACHE_EPOCH_OFFSET) // 4
        self._u32[index] = (self._u32[index] + 1) & 0xFFFFFFFF

    def drain(self, matches: Callable[[UpstreamRow], bool], drained: bool) -> list[UpstreamRow]:
        """Drain the upstreams ``matches`` picks (no new requests; those in flight go on),
        or take them back (drained=False); the rows as they are now."""
        changed = []
        with self.locked():
            for row in self._used_rows():
                if matches(row):
                    self._map[self._offset(row.index) + DRAINED_OFFSET] = int(drained)
                    changed.append(self._row(row.index))
            if changed:
                self._restructured()  # what policies remember depends on it
        return changed


def _alive(pid: int, started: int) -> bool:
    current = process_start_time(pid)
    return current is not None and started in (0, current)
