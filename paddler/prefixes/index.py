"""Which upstreams took each prompt prefix: a bounded table shared by every worker.

One file beside the slot table (``<slot table>.prefixes``), mapped by every balancer
process. A set-associative hash table: a key's set is ``key % sets``, each set holds
WAYS entries, one per (prefix, upstream): a prefix sent to two upstreams is held by
both (llama.cpp keeps prompts in host memory too, so both may still have it). A new
entry takes the way used longest ago (least recently used first, within its set).
Writers hold an flock on the file; readers do not: a torn entry can at worst make one
guess wrong, and every guess is checked against the slot table (the row's generation
and cache epoch) before it counts.

An entry also counts the requests with that prefix in flight on its upstream. llama.cpp
keeps a prompt in the KV cache of the slot that processed it, and a slot serves one
request at a time: while a request runs, a second one with the same prefix lands on
another slot and processes the prompt again, sharing the server's compute with the
first. Such a holder is busy, and not offered as one. A count left behind by a worker
that was killed mid-request stops counting BUSY_HORIZON seconds after its entry was
last used, so that it cannot keep an upstream's prefix out of use for good.

Unless the upstream holds more than one copy. llama.cpp gives a request the free slot
whose prompt shares the most with it, and before it overwrites more than half of that
prompt, it saves the prompt to its host-memory prompt cache (--cache-ram, on by
default), from which any free slot can load it again. So a prompt that branches off a
prefix where a prompt more than twice as long went on from it (a new conversation after
a shared system prompt, where an older conversation ran) leaves a copy of the prefix
in the host cache; one that branches off a prompt mostly its own length (a group's
short question after its long system prompt) reuses the slot in place, one copy; until
another task starts on the upstream while that slot is idle: llama.cpp then saves the
idle slot's prompt to its host cache too (saved(), from the slot record). An
entry counts such copies, and how long the prompts that went on from it were (its
reach). Whether the copies are still there when needed depends on the size of the host
cache, which the balancer cannot see: it learns it (the copy trust in the header, from
llama.cpp's timings of the requests that relied on one), and counts them only while
they keep being found.

Copies saved from idle slots are counted apart (saved copies: llama.cpp saves every
idle slot's prompt as a task starts; paddler/prefixes/slots.py sees it). llama.cpp drops
the oldest saves once its host cache is full, so a saved copy counts only while what the
upstream saved since leaves room for it: the tokens saved since (the slot record counts
them, with the answers', as llama.cpp's timings give them) at most HOST_HEADROOM of the
host cache's size, which the upstream's agent reports (paddler/llamacpp/host_cache.py;
an upstream whose agent cannot tell has none counted). holders() asks the caller
(affinity.py) whether that holds, for each saved copy it would count. A request sent to
a saved copy overwrites another slot, whose prompt then lives in the host cache alone: a
cache that keeps one or two prompts keeps the latest saves
and drops the rest, so that the copy sent to is found and the prompt it displaced is
lost (bench W2 with a 32 MiB host cache, 2,048 tokens of the bench model, saved copies
counted without knowing the size: 15 full prefills where 4 were due, displaced groups
displacing others to the end of the run). And only while the host trust in the header
is at least HOST_TRUSTED: it measures what every request that relied on the host cache
found there, not only those sent to a saved copy (a request the slot record gave a slot
that llama.cpp refills from its host cache, where the prefix expected on the upstream
is in no slot), and turns saved copies off where the size misleads (docs/routing.md:
--kv-unified, a model whose KV cache is not a standard attention one's).

File layout, little-endian:
    offset 0   8s   magic b"PDLRPRFX"
    offset 8   u32  layout version
    offset 12  u32  sets
    offset 16  f64  seconds of prefill per prompt character, as llama.cpp's timings
                    measure it (0: not measured yet); cache_aware's waits are bounded by it
    offset 24  f64  copy trust: a moving average of whether requests sent to a copy
                    beyond an upstream's first found it cached (1 at start)
    offset 32  f64  when a spare copy was last offered while the trust was too low
                    (CLOCK_MONOTONIC seconds): a probe, one every PROBE_EVERY seconds
    offset 40  f64  host trust: a moving average of whether requests that relied on
                    llama.cpp's host cache found there what they expected (HOST_START at
                    start); saved copies count while it is at least HOST_TRUSTED
    offset 48  f64  prompt tokens per character, as llama.cpp's timings count them (0: not
                    measured yet): the slot record's estimate of a prompt's tokens until
                    its answer says
    then sets x WAYS entries of 40 bytes:
               u64 key (0: free), u16 row, u16 requests in flight, u32 row generation,
               u32 cache epoch, u32 last used (CLOCK_MONOTONIC seconds), u16 copies
               (of the prefix on the row: in slots, or in llama.cpp's host cache), u8
               flags (1: a prompt ended here, its next turn is a continuation, not a
               branch), u8 saved copies (in llama.cpp's host cache, saved from an idle
               slot: saved()), u32 reach (the longest prompt that went on from the
               prefix on the row, in characters), u64 the row's tokens saved to its
               host cache before the last saved copy was (saved())
"""

import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

from paddler.prefixes.mapped import create_mapped, open_mapped

MAGIC: Final = b"PDLRPRFX"
VERSION: Final = 5
HEADER: Final = struct.Struct("<8sII")
HEADER_SIZE: Final = 64
WAYS: Final = 4
ENTRY: Final = struct.Struct("<QHHIIIHBBIQ")
SET: Final = struct.Struct("<" + "QHHIIIHBBIQ" * WAYS)
FIELDS: Final = 11  # per entry, as SET unpacks them
# copies, flags, saved copies, reach: written together (a pad byte would be written too)
TAIL_FIELDS: Final = struct.Struct("<HBBI")
TAIL_OFFSET: Final = 24
TAIL: Final = 1  # flags: a prompt on the row ended with this prefix
COUNT: Final = struct.Struct("<H")  # an entry's requests in flight, written alone
SAVED: Final = struct.Struct("<B")  # an entry's saved copies, written alone
SAVED_OFFSET: Final = 27
SAVED_AT: Final = struct.Struct("<Q")  # an entry's last save, written with SAVED
SAVED_AT_OFFSET: Final = 32
HEADER_F64: Final = struct.Struct("<d")  # the header's f64 fields: prefill rate, trusts, probes
PREFILL_OFFSET: Final = 16
TRUST_OFFSET: Final = 24
PROBE_OFFSET: Final = 32
HOST_TRUST_OFFSET: Final = 40
TOKENS_PER_CHAR_OFFSET: Final = 48
# Below this copy trust, an upstream's copies beyond the first do not count, but for
# one request every PROBE_EVERY seconds: without one, nothing could raise it again.
TRUSTED: Final = 0.5
# Saved copies count until a request that relied on the host cache missed what it relied
# on there (at the trusts' rate, affinity.py's TRUST_RATE: 1 to 0.75), and again once
# requests found raise it (one after a single miss from 1, three after two).
HOST_TRUSTED: Final = 0.8
HOST_START: Final = 1.0
PROBING: Final = 2  # _offered(): copies beyond the first count for this request alone
PROBE_EVERY: Final = 60.0
# llama.cpp loads no prompt from its host cache for a request that shares less than a
# quarter of it ("don't trash large prompts"): a copy saved there in a prompt more than
# this many times a prefix's length is no copy of that prefix. (Measured against reach,
# the longest prompt that went on from the prefix: the copy is at most that long.)
UNTRASHED: Final = 4
# A saved copy counts while the prompts saved since, and it, take at most this part of
# the host cache: llama.cpp's saves hold the answers too, tokens per character vary, and
# the next save makes room first.
HOST_HEADROOM: Final = 0.5
BUSY_HORIZON: Final = 600  # seconds: longer than llama.cpp answers run
DEFAULT_SETS: Final = 16384  # 65,536 prefixes, 2.5 MB


class PrefixIndexError(Exception):
    pass


class Holder:
    """An upstream that took a prefix: its row as it was then, the prefix's length, and
    its rank among the request's holders (0: it holds the longest prefix found). (A
    plain class: several are made for every request, and compiled a native class costs
    a fraction of a NamedTuple, whose constructor is Python code.)"""

    __slots__ = (
        "epoch",
        "generation",
        "length",
        "rank",
        "row",
        "saved",
        "saved_at",
        "spare",
        "whole",
    )

    def __init__(
        self,
        row: int,
        generation: int,
        epoch: int,
        length: int,
        rank: int = 0,
        spare: bool = False,
        saved: bool = False,
        whole: bool = True,
        saved_at: int = 0,
    ) -> None:
        self.row = row
        self.generation = generation
        self.epoch = epoch
        self.length = length
        self.rank = rank
        # Free only by a copy beyond the first: one copy is in use by a request.
        self.spare = spare
        # That copy is one saved from an idle slot (the host trust's, not the copy
        # trust's).
        self.saved = saved
        # The upstream's tokens saved to its host cache before that copy was
        # (paddler/prefixes/slots.py: saved_since()).
        self.saved_at = saved_at
        # No prompt that went on from the prefix there is over UNTRASHED times its
        # length: one saved in llama.cpp's host cache can give the prefix back.
        self.whole = whole


class PrefixIndex:
    def __init__(self, path: Path, fd: int, mapping: mmap.mmap, sets: int) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self.sets = sets

    @classmethod
    def create(cls, path: Path, sets: int = DEFAULT_SETS) -> "PrefixIndex":
        header = bytearray(HEADER_SIZE)
        HEADER.pack_into(header, 0, MAGIC, VERSION, sets)
        HEADER_F64.pack_into(header, TRUST_OFFSET, 1.0)
        HEADER_F64.pack_into(header, HOST_TRUST_OFFSET, HOST_START)
        create_mapped(path, HEADER_SIZE + sets * SET.size, bytes(header))
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> "PrefixIndex":
        fd, mapping, sets = open_mapped(
            path, "prefix index", MAGIC, VERSION, HEADER, HEADER_SIZE, SET.size, PrefixIndexError
        )
        return cls(path, fd, mapping, sets)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    @property
    def prefill_rate(self) -> float:
        """Seconds of prefill per prompt character, learned by every worker together.
        (Written without the lock: an aligned 8-byte store is whole on the platforms we
        build for, and two workers' updates crossing lose one measurement at worst.)"""
        rate: float = HEADER_F64.unpack_from(self._map, PREFILL_OFFSET)[0]
        return rate

    @prefill_rate.setter
    def prefill_rate(self, rate: float) -> None:
        HEADER_F64.pack_into(self._map, PREFILL_OFFSET, rate)

    @property
    def copy_trust(self) -> float:
        """How often a request sent to a copy of a prefix beyond its upstream's first
        found it cached: a moving average, shared by every worker, 1 at start. (Written
        without the lock, as prefill_rate.)"""
        trust: float = HEADER_F64.unpack_from(self._map, TRUST_OFFSET)[0]
        return trust

    @copy_trust.setter
    def copy_trust(self, trust: float) -> None:
        HEADER_F64.pack_into(self._map, TRUST_OFFSET, trust)

    @property
    def host_trust(self) -> float:
        """How often requests that relied on llama.cpp's host cache found there what
        they expected: a moving average, shared by every worker (saved copies count
        while it is at least HOST_TRUSTED). (Written without the lock, as
        prefill_rate.)"""
        trust: float = HEADER_F64.unpack_from(self._map, HOST_TRUST_OFFSET)[0]
        return trust

    @host_trust.setter
    def host_trust(self, trust: float) -> None:
        HEADER_F64.pack_into(self._map, HOST_TRUST_OFFSET, trust)

    @property
    def tokens_per_char(self) -> float:
        """Prompt tokens per character, as llama.cpp's timings count them (0: not
        measured yet). (Written without the lock, as prefill_rate.)"""
        ratio: float = HEADER_F64.unpack_from(self._map, TOKENS_PER_CHAR_OFFSET)[0]
        return ratio

    @tokens_per_char.setter
    def tokens_per_char(self, ratio: float) -> None:
        HEADER_F64.pack_into(self._map, TOKENS_PER_CHAR_OFFSET, ratio)

    def copies(self, key: int, row: int) -> int:
        """Copies of this prefix on ``row`` (0: not held there), saved ones apart."""
        return self._field(key, row, 6)

    def saved_copies(self, key: int, row: int) -> int:
        """Copies of this prefix on ``row`` saved from its idle slots (saved())."""
        return self._field(key, row, 8)

    def _set_offset(self, key: int) -> int:
        return HEADER_SIZE + (key % self.sets) * SET.size

    def find(self, key: int) -> list[tuple[int, int, int]]:
        """(row, generation, epoch) of every upstream that took this prefix."""
        return [
            (holder.row, holder.generation, holder.epoch)
            for holder in self.holders([(key, 0)], most=WAYS)
        ]

    def in_flight(self, key: int, row: int) -> int:
        """Requests with this prefix in flight on ``row``, as counted (0: not held there)."""
        return self._field(key, row, 2)

    def _field(self, key: int, row: int, field: int) -> int:
        fields = SET.unpack_from(self._map, self._set_offset(key))
        way = self._way(fields, key, row)
        return 0 if way is None else int(fields[FIELDS * way + field])

    def holders(
        self,
        keys: list[tuple[int, int]],
        most: int = 4,
        now: float | None = None,
        busy: list[Holder] | None = None,
        keeps: Callable[[int, int, int], bool] | None = None,
    ) -> list[Holder]:
        """The upstreams holding these prefixes (keys shortest first, as prefix_keys
        gives them): those of the longest prefix found first (rank 0), then those of
        shorter ones, at most ``most`` different rows. Given ``now``, an upstream whose
        copies of a prefix are all busy does not hold it (it may hold a shorter one idle);
        given ``busy`` too, such holders of prefixes longer than any idle one are added
        to it. Copies beyond an upstream's first count while the copy trust is high
        enough, and for one request every PROBE_EVERY seconds while it is not (a holder
        of the longest prefix found, which the request is sent to); saved copies while
        the host trust is high enough, and ``keeps`` (row, generation, tokens saved on
        the row before the copy) says the host cache still keeps them (none without
        it)."""
        found: list[Holder] = []
        rows: set[int] = set()
        rank = 0
        branched = self._offered(now)
        saving = keeps is not None and now is not None and self.host_trust >= HOST_TRUSTED
        for key, length in reversed(keys):
            fields = SET.unpack_from(self._map, HEADER_SIZE + (key % self.sets) * SET.size)
            hit = False
            reported = 0 if busy is None else len(busy)
            for way in range(0, FIELDS * WAYS, FIELDS):
                if fields[way] != key or fields[way + 1] in rows:
                    continue
                spare = False
                saved = False
                in_flight = fields[way + 2]
                if now is not None and in_flight and now - fields[way + 5] < BUSY_HORIZON:
                    # (A probe only for the longest prefix's holders: a request is sent
                    # to one of them, so that it measures what it spends.)
                    counted = branched == 1 or (branched == PROBING and rank == 0)
                    copies = fields[way + 6] if counted else 1
                    if in_flight < copies:
                        spare = True  # one copy is in use, another is not
                        branched = self._spend(branched, now)
                    elif (
                        saving
                        and keeps is not None
                        and in_flight < copies + fields[way + 8]
                        and length * UNTRASHED >= fields[way + 9]
                        and keeps(fields[way + 1], fields[way + 3], fields[way + 10])
                    ):
                        spare = saved = True  # as above, a copy saved from an idle slot
                    else:
                        # Busy: requests with this prefix are in flight there, on every
                        # copy. (Only the holders of the longest busy prefix are of use
                        # to the caller.)
                        first = not busy or busy[0].length == length
                        if busy is not None and not found and first:
                            row = fields[way + 1]
                            busy.append(Holder(row, fields[way + 3], fields[way + 4], length))
                        continue
                rows.add(fields[way + 1])
                found.append(
                    Holder(
                        fields[way + 1],
                        fields[way + 3],
                        fields[way + 4],
                        length,
                        rank,
                        spare,
                        saved,
                        length * UNTRASHED >= fields[way + 9],
                        fields[way + 10],
                    )
                )
                hit = True
            if hit:
                if busy is not None:
                    del busy[reported:]  # an idle copy of the same prefix: none needed
                rank += 1
                if len(found) >= most:
                    break
        return found[:most]

    def _offered(self, now: float | None) -> int:
        """Whether copies beyond an upstream's first count: 0 no, 1 yes (the copy trust
        is at least TRUSTED), PROBING for one request (the last probe was PROBE_EVERY
        seconds ago). Never without ``now``."""
        if now is None:
            return 0
        if self.copy_trust >= TRUSTED:
            return 1
        last = HEADER_F64.unpack_from(self._map, PROBE_OFFSET)[0]
        return PROBING if now - last >= PROBE_EVERY else 0

    def _spend(self, offered: int, now: float) -> int:
        """A copy beyond the first was offered now: if as a probe, such copies count no
        more until PROBE_EVERY seconds from now."""
        if offered != PROBING:
            return offered
        HEADER_F64.pack_into(self._map, PROBE_OFFSET, now)
        return 0

    def remember(
        self,
        keys: list[int],
        row: int,
        generation: int,
        epoch: int,
        now: float,
        occupy: bool = False,
        tail: int = 0,
        held: list[int] | None = None,
        known: int = 0,
        chars: int = 0,
        branches: bool = True,
    ) -> None:
        """The upstream in ``row`` takes these prefixes now; ``occupy``: and a request
        with them is in flight there until vacate(). ``tail``: the key a next turn of
        the request's prompt would share with it (its last message's; a plain prompt's
        last whole block). ``held``: the prefixes it found there (shortest first),
        ``known`` characters long, which it goes on from: a continuation of the prompt
        that ended there, or a branch (``branches``: one that may add a copy; not one
        sent to a spare copy, which llama.cpp moves from its host cache into the slot the
        request takes). ``chars``: the prompt's length."""
        if not keys and not held:
            return
        used = int(now)
        # The lock taken by hand and each key's set read by _set(): this runs for every
        # streamed request twice (here and in vacate), and a generator or a call with a
        # keyword argument costs more, compiled, than the rest of the work.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if held:
                self._branch(held, row, generation, epoch, known, chars, tail, branches)
            for key in keys:
                offset, fields = self._set(key)
                in_flight = 0
                copies = 1
                flags = 0
                saved = 0
                saved_at = 0
                reach = chars
                # Its own way, else a free one, else the one used longest ago.
                way = self._way(fields, key, row)
                if way is None:
                    way = _oldest_way(fields)
                elif fields[FIELDS * way + 3] == generation and fields[FIELDS * way + 4] == epoch:
                    in_flight = fields[FIELDS * way + 2]
                    if used - fields[FIELDS * way + 5] >= BUSY_HORIZON:
                        in_flight = 0  # left by a worker that died mid-request
                    copies = max(1, fields[FIELDS * way + 6])
                    flags = fields[FIELDS * way + 7]
                    saved = fields[FIELDS * way + 8]
                    reach = max(reach, fields[FIELDS * way + 9])
                    saved_at = fields[FIELDS * way + 10]
                if occupy:
                    in_flight = min(0xFFFF, in_flight + 1)
                if key == tail:
                    flags |= TAIL
                ENTRY.pack_into(
                    self._map,
                    offset + way * ENTRY.size,
                    key,
                    row,
                    in_flight,
                    generation,
                    epoch,
                    used,
                    copies,
                    flags,
                    saved,
                    min(0xFFFFFFFF, reach),
                    saved_at,
                )
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def saved(
        self, keys: list[int], row: int, generation: int, epoch: int, saved_at: int = 0
    ) -> None:
        """llama.cpp saved an idle slot's prompt, which has these prefix keys, to the
        host cache of the upstream in ``row``, which had ``saved_at`` tokens saved
        before (paddler/prefixes/slots.py: saved_since()): one saved copy more of each
        of them that the upstream holds (_save_idle), the latest saved then. A key it
        does not hold is left out: the prompt went there without this balancer."""
        if not keys:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # as in remember()
        try:
            for key in keys:
                offset, fields = self._set(key)
                way = self._own_way(fields, key, row, generation, epoch)
                if way is None:
                    continue
                saved = min(0xFF, fields[FIELDS * way + 8] + 1)
                SAVED.pack_into(self._map, offset + way * ENTRY.size + SAVED_OFFSET, saved)
                SAVED_AT.pack_into(self._map, offset + way * ENTRY.size + SAVED_AT_OFFSET, saved_at)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def vacate(self, keys: list[int], row: int, generation: int) -> None:
        """A request that occupied these prefixes on ``row`` ended."""
        if not keys:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # as in remember()
        try:
            for key in keys:
                offset, fields = self._set(key)
                way = self._way(fields, key, row)
                if way is None or fields[FIELDS * way + 3] != generation:
                    continue  # forgotten meanwhile, or the row went to another upstream
                in_flight = fields[FIELDS * way + 2]
                if in_flight:
                    # The count alone: its u16 sits right after the row's.
                    COUNT.pack_into(self._map, offset + way * ENTRY.size + 10, in_flight - 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _branch(
        self,
        held: list[int],
        row: int,
        generation: int,
        epoch: int,
        known: int,
        chars: int,
        tail: int,
        branches: bool,
    ) -> None:
        """A prompt ``chars`` long that begins with the prefixes ``held`` (shortest
        first, ``known`` characters), which ``row`` holds, goes on past them there. Past
        where another prompt ended (a conversation's next turn), it continues that one,
        in its slot. Past a prefix that longer prompts went on from, more than twice its
        length, it branches off: llama.cpp saves the prompt in the slot it takes to its
        host cache first, one more copy of each of ``held``. Either way those prefixes
        now reach at least as far as this prompt. (Under the lock.)"""
        offset, fields = self._set(held[-1])
        way = self._own_way(fields, held[-1], row, generation, epoch)
        if way is None:
            return
        continues = bool(fields[FIELDS * way + 7] & TAIL)
        reach = fields[FIELDS * way + 9]
        copy = branches and not continues and 2 * known < reach <= UNTRASHED * known
        for key in held:
            offset, fields = self._set(key)
            way = self._own_way(fields, key, row, generation, epoch)
            if way is None:
                continue
            copies = max(1, fields[FIELDS * way + 6])
            flags = fields[FIELDS * way + 7]
            if key == held[-1]:
                # Continued: the prompt that ended here ends here no more (unless this
                # one does too: a plain prompt's last whole block).
                flags = flags | TAIL if key == tail else flags & ~TAIL
            TAIL_FIELDS.pack_into(
                self._map,
                offset + way * ENTRY.size + TAIL_OFFSET,
                min(0xFFFF, copies + 1) if copy else copies,
                flags,
                fields[FIELDS * way + 8],
                min(0xFFFFFFFF, max(chars, fields[FIELDS * way + 9])),
            )

    def _set(self, key: int) -> tuple[int, tuple[int, ...]]:
        """The offset of ``key``'s set, and the set's fields."""
        offset = HEADER_SIZE + (key % self.sets) * SET.size
        return offset, SET.unpack_from(self._map, offset)

    @staticmethod
    def _own_way(
        fields: tuple[int, ...], key: int, row: int, generation: int, epoch: int
    ) -> int | None:
        """The way of ``key`` on ``row`` in a set, if it is that upstream's, in that
        cache epoch (else its counts are another's, or void)."""
        way = PrefixIndex._way(fields, key, row)
        if (
            way is None
            or fields[FIELDS * way + 3] != generation
            or fields[FIELDS * way + 4] != epoch
        ):
            return None
        return way

    @staticmethod
    def _way(fields: tuple[int, ...], key: int, row: int) -> int | None:
        for way in range(WAYS):  # a loop, not next() over a generator: it runs per request
            if fields[FIELDS * way] == key and fields[FIELDS * way + 1] == row:
                return way
        return None


def _oldest_way(fields: tuple[int, ...]) -> int:
    """The way a new entry takes in a set: a free one, else the one used longest ago."""
    chosen = 0
    for way in range(1, WAYS):
        if (fields[FIELDS * way] != 0, fields[FIELDS * way + 5]) < (
            fields[FIELDS * chosen] != 0,
            fields[FIELDS * chosen + 5],
        ):
            chosen = way
    return chosen
