"""Which prompt each slot of each upstream holds: the balancer's own record, shared by
every worker, from which cache_aware names the slot a request takes (llama.cpp's
``id_slot``).

cache_aware chooses the upstream; left to itself, llama.cpp chooses the slot: the idle
one whose prompt shares the longest prefix with the request (more than a tenth of it),
ties going to the first by slot number, else the one used longest ago. A new
conversation after a system prompt shares that prompt with every slot that holds a
conversation after it: llama.cpp overwrites the first of them by number (it skips
empty slots when it matches prompts), which may be a conversation still going, while a
conversation that ended longer ago, or a slot never used, could have taken it. In bench
W1, the next turn of the conversation overwritten then processed its whole prompt
again: llama.cpp had saved it to its host cache, but gave that turn the slot now
sharing the system prompt with it, most of which it keeps, so it loaded nothing. The
balancer sent every request there and knows when each slot was last used. So it names
the slot: one whose prompt the request goes on from in place (it keeps at least half
of it), of several as deep one with at most one message past that prefix first, then
the one used longest ago, unless it holds a conversation of several turns past what the
request shares with it and another idle slot sharing as much was used longer ago (then
the one used longest ago of those); else the one sharing the most with the prompt, the
one used longest ago of several; else the one used longest ago, a slot never used
first.

Overwriting a slot loses nothing while llama.cpp's host-memory prompt cache has room:
it saves the slot's prompt there before overwriting most of it, and (from the builds
with --cache-idle-slots, on by default) saves every idle slot's prompt whenever a task
starts (take() reports those prompts, once each, for the prefix index to count as
saved copies: a request whose prefix is busy in one slot can load it into another); a
request that goes on from a saved prompt loads it into whatever slot it is given,
unless that slot is empty or already holds at least half of what the request would
keep. (Measured on one llama-server, 2 slots, the default 8 GiB cache: prompt A
in slot 1, prompt B in slot 0, then A named to slot 0: 1,771 of 1,787 tokens from
cache.) A slot never used loads nothing (llama.cpp #28139: a named slot that is empty
skips the host cache), so it is taken last among slots that share a prefix with the
request: bench W1 with the 8 GiB cache, a new conversation given the empty slot
processed its system prompt again (about 1 s), where the slot of one that ended held
it. With a cache too small to keep a conversation overwritten, its next turn processes
what the cache lost, as it would have with llama.cpp choosing the slot.

Naming a slot costs nothing of llama.cpp's host-memory prompt cache on the builds this
is done for (paddler/balancer/proxy/affinity.py: PINNING_BUILD): a request for a named
slot still has the slot's prompt saved before most of it is overwritten, and the best
match loaded from there. A slot never used is named only while another slot of the
upstream is taken by a request just sent (PLACING) that llama.cpp has not begun
answering, which it may not have queued yet (two requests would then each take the
other's slot); left unnamed, the empty slot loads what the request shares with a
prompt in the host cache (one llama-server, the default cache: a prompt saved there,
then sent again while only an empty slot was free, found 621 of 637 tokens cached
unnamed, none named).

The record is only as good as what went through this balancer: a request that some
other client sent to the upstream is not in it. So slots are named only on upstreams
whose slots are all this balancer's (affinity.py), and a slot the record wrongly
thinks free costs a short wait inside llama.cpp, not a failure.

One file beside the slot table (``<slot table>.contents``), mapped by every balancer
process; writers hold an flock on it. Layout, little-endian:
    offset 0   8s   magic b"PDLRSLTS"
    offset 8   u32  layout version
    offset 12  u32  rows (as the slot table's)
    then rows x ROW_SIZE bytes, each
        u32 the row's generation, u32 its cache epoch, when its slots were last
            recorded (either moved: nothing is known of its slots), u64 tokens of
            prompts llama.cpp saved to its host cache since (saved_since()), u64 that
            count when requests this balancer did not send were last seen there
            (unseen(): what was saved before is not known to be kept)
        then SLOTS records of RECORD_SIZE bytes:
            f64 last used (CLOCK_MONOTONIC seconds: when its last request ended; 0 never)
            f64 busy since (when a request took it; 0: idle; negative, -(when it
                took it): llama.cpp began answering it, so it has its slot)
            u16 keys held, u8 1 once its prompt was saved to llama.cpp's host cache
                (_save_idle), 1 spare, u32 the length of that prompt in characters,
                u32 the tokens the slot holds (its prompt's and answer's, as llama.cpp's
                timings count them: measured(); estimated from the characters until then),
                4 bytes spare
            MAX_KEYS x u64: the prefix keys of the prompt it last took, shortest first
"""

import fcntl
import mmap
import os
import struct
from pathlib import Path
from typing import Final

from paddler.prefixes.keys import MAX_KEYS
from paddler.prefixes.mapped import create_mapped, open_mapped

MAGIC: Final = b"PDLRSLTS"
VERSION: Final = 4
HEADER: Final = struct.Struct("<8sII")
HEADER_SIZE: Final = 64
SLOTS: Final = 32  # upstreams with more slots are left to choose their own
ROW: Final = struct.Struct("<IIQQ")
SAVED_TOKENS: Final = struct.Struct("<Q")  # the row's tokens saved, written alone
SAVED_TOKENS_OFFSET: Final = 8
UNSEEN: Final = struct.Struct("<Q")  # the count at the last unseen(), written alone
UNSEEN_OFFSET: Final = 16
# last used, busy since, keys held, saved, prompt length, tokens held
STATE: Final = struct.Struct("<ddHBxII4x")  # (32 bytes: the keys after it aligned)
TOKENS: Final = struct.Struct("<I")  # tokens held, written alone
TOKENS_OFFSET: Final = 24
SAVED: Final = struct.Struct("<B")  # saved, written alone
SAVED_OFFSET: Final = 18
TIMES: Final = struct.Struct("<dd")  # last used, busy since: written alone
BUSY: Final = struct.Struct("<d")  # busy since, as llama.cpp begins answering: alone
KEY: Final = struct.Struct("<Q")
KEYS: Final = struct.Struct("<" + "Q" * MAX_KEYS)
RECORD_SIZE: Final = STATE.size + KEYS.size
ROW_SIZE: Final = ROW.size + SLOTS * RECORD_SIZE
BUSY_HORIZON: Final = 600.0  # seconds: longer than llama.cpp answers run
# llama.cpp's --slot-prompt-similarity (0.1 by default): a slot sharing no more than this
# part of the request's prompt is no match, and the one used longest ago is taken.
SIMILARITY: Final = 0.1
# How many of a slot's prefix keys may lie past the prefix a request shares with it for
# the request to go on from it in place while another idle slot shares as much: one
# message (a question after a shared system prompt, answered and done). More is a
# conversation of several turns, which may go on.
IN_PLACE_PAST: Final = 1
# Seconds after it was sent within which a request that llama.cpp has not begun
# answering may not have a slot there yet. llama.cpp gives slots to tasks in the order
# its HTTP threads queue them, each after parsing and tokenizing its request (a few
# milliseconds; tens for the longest prompts): a request sent this much later is queued
# after it, whatever llama.cpp is busy with meanwhile.
PLACING: Final = 0.1
_NOTHING: Final = bytes(ROW_SIZE)


class SlotContentsError(Exception):
    pass


class SlotContents:
    def __init__(self, path: Path, fd: int, mapping: mmap.mmap, rows: int) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self.rows = rows

    @classmethod
    def create(cls, path: Path, rows: int) -> "SlotContents":
        create_mapped(path, HEADER_SIZE + rows * ROW_SIZE, HEADER.pack(MAGIC, VERSION, rows))
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> "SlotContents":
        fd, mapping, rows = open_mapped(
            path, "slot record", MAGIC, VERSION, HEADER, HEADER_SIZE, ROW_SIZE, SlotContentsError
        )
        return cls(path, fd, mapping, rows)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def take(
        self,
        row: int,
        generation: int,
        epoch: int,
        total: int,
        keys: list[tuple[int, int]],
        chars: int,
        now: float,
        saved: list[int] | None = None,
        refilled: list[int] | None = None,
        saved_at: list[int] | None = None,
        tokens: int = 0,
    ) -> tuple[int, bool]:
        """The slot of ``row`` (``total`` slots) that a request whose prompt has these
        prefix keys (shortest first) and is ``chars`` long takes, recorded as taken by
        it until release() (-1: none that the record can tell), and whether to name it.
        Given ``saved``, the prefix keys of the other idle slots' prompts that llama.cpp
        saves to its host cache as the request starts are added to it (_save_idle).
        Given ``refilled``, what llama.cpp refills the slot from is added to it: the
        characters of the prompt that the slot shares with it, where llama.cpp looks in
        its host cache for more (a slot whose prompt the request mostly overwrites: it
        saves that prompt first, then loads the best match of the request's; an empty
        slot it picks itself: 0); else -1 (a slot the request goes on from in place; an
        empty slot that is named, llama.cpp #28139). Given ``saved_at``, the row's
        tokens saved before the prompts added to ``saved`` is added to
        it: those saves are still in the host cache while what is saved after them
        leaves room for them (saved_since()). ``tokens``: what the slot will hold, as far as known
        before the answer (measured() says after).

        The idle slot holding the longest prefix of the prompt (more than a tenth of
        it, as llama.cpp counts) that is at least half of the slot's prompt, which the
        request then goes on from in place; of several, one past whose shared prefix
        the slot holds at most one more message, then the one used longest ago. If the
        slot holds a conversation of several turns past that prefix and another idle
        slot shares as much, the one used longest ago of those. (Bench W1: a new
        conversation took, in place, the slot of one in its third turn, whose system
        prompt was just over half its characters, where a conversation that had ended
        held another; the one going on lost its turns.) Else the request overwrites
        most of the slot it takes: of the idle slots sharing a prefix with it, the one
        sharing the most, the one used longest ago of several (its prompt is saved to
        llama.cpp's host cache first; the module's docstring says why a slot never used
        comes last); else the one used longest ago, a slot never used first (of several,
        the last, as llama.cpp takes them).

        A slot never used is named only while another slot of the upstream is taken by
        a request sent less than PLACING ago that llama.cpp has not begun answering
        (begun()): otherwise llama.cpp takes the same one (no idle slot shares the
        prompt), and loads what it can of the prompt from its host-memory cache into
        it, which it does not for an empty slot that is named (llama.cpp #28139). Such
        a request may not be in llama.cpp's queue yet, and an unnamed one that it
        queues first takes a slot by its own rule, maybe the one the record gave the
        other: that one then waits inside llama.cpp, and the record holds each prompt
        in the wrong slot until they are named again."""
        if total <= 0 or total > SLOTS or row < 0 or row >= self.rows:
            return -1, False
        lengths: dict[int, int] = {}
        for key, length in keys:  # a loop: no comprehension per request
            lengths[key] = length
        base = HEADER_SIZE + row * ROW_SIZE
        mapping = self._map
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            known_generation, known_epoch, _, _ = ROW.unpack_from(mapping, base)
            if known_generation != generation or known_epoch != epoch:
                # Another upstream in the row, or this one lost its cache: its slots'
                # prompts are unknown (and what was in flight there is not ours).
                mapping[base : base + ROW_SIZE] = _NOTHING
                ROW.pack_into(mapping, base, generation, epoch, 0, 0)
            chosen, named, in_place, depth = self._choose(base, total, lengths, chars, now)
            if chosen < 0:
                return -1, False
            saved_tokens = SAVED_TOKENS.unpack_from(mapping, base + SAVED_TOKENS_OFFSET)[0]
            if saved_at is not None:
                saved_at.append(saved_tokens)
            if saved is not None:
                saved_tokens += self._save_idle(base, total, chosen, now, saved)
            offset = base + ROW.size + chosen * RECORD_SIZE
            used, _, held, done, _, before = STATE.unpack_from(mapping, offset)
            if held > 0 and not in_place and not done:
                saved_tokens += before  # llama.cpp saves what the request overwrites
            SAVED_TOKENS.pack_into(mapping, base + SAVED_TOKENS_OFFSET, saved_tokens)
            if refilled is not None:
                refilled.append(depth if not in_place and (held > 0 or not named) else -1)
            prompt = [key for key, _ in keys[-MAX_KEYS:]]
            STATE.pack_into(
                mapping,
                offset,
                used,
                now,
                len(prompt),
                0,
                min(chars, 0xFFFFFFFF),
                min(max(tokens, 0), 0xFFFFFFFF),
            )
            prompt.extend([0] * (MAX_KEYS - len(prompt)))
            KEYS.pack_into(mapping, offset + STATE.size, *prompt)
            return chosen, named
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _save_idle(self, base: int, total: int, chosen: int, now: float, saved: list[int]) -> int:
        """A request takes slot ``chosen`` of the row at ``base``: llama.cpp (from the
        builds with --cache-idle-slots, on by default with a host cache) saves every
        idle slot's prompt to its host cache as the task starts, where a request sent
        to any slot it mostly overwrites loads it. The prefix keys of those prompts not
        saved since they were taken go to ``saved``: a saved copy more of each on the
        upstream (paddler/prefixes/index.py counts those only while the host cache is
        trusted to keep what is saved there). The tokens saved. (Under the lock.)"""
        mapping = self._map
        added = 0
        for slot in range(total):
            if slot == chosen:
                continue
            offset = base + ROW.size + slot * RECORD_SIZE
            _, busy, held, done, _, tokens = STATE.unpack_from(mapping, offset)
            if held == 0 or done or (busy != 0.0 and now - abs(busy) < BUSY_HORIZON):
                continue
            saved.extend(KEYS.unpack_from(mapping, offset + STATE.size)[:held])
            SAVED.pack_into(mapping, offset + SAVED_OFFSET, 1)
            added += tokens
        return added

    def _choose(
        self, base: int, total: int, lengths: dict[int, int], chars: int, now: float
    ) -> tuple[int, bool, bool, int]:
        """take()'s choice among the slots of the row at ``base``, whether to name it,
        whether the request goes on from its prompt in place, and how many characters
        of the prompt it shares (under the lock)."""
        mapping = self._map
        chosen = -1
        chosen_depth = 0
        chosen_used = 0.0
        chosen_past = 0
        # Idle slots sharing a prefix with the prompt: depth, slot, last used, and
        # whether the request would go on from the slot's prompt in place.
        sharing: list[tuple[int, int, float, bool]] = []
        oldest = -1
        oldest_used = 0.0
        in_flight = False  # a slot taken by a request llama.cpp may not have seen yet
        for slot in range(total):
            offset = base + ROW.size + slot * RECORD_SIZE
            used, busy, held, _, length, _ = STATE.unpack_from(mapping, offset)
            if busy != 0.0 and now - abs(busy) < BUSY_HORIZON:
                # Just sent and not begun: llama.cpp may not have queued it yet.
                in_flight = in_flight or (busy > 0.0 and now - busy < PLACING)
                continue
            if oldest < 0 or used <= oldest_used:
                oldest = slot
                oldest_used = used
            depth = 0
            past = 0  # the slot's keys past the deepest one the request shares
            at = offset + STATE.size + (held - 1) * KEY.size
            while held > 0 and lengths:  # deepest first: the first found is the longest
                depth = lengths.get(KEY.unpack_from(mapping, at)[0], 0)
                if depth:
                    break
                held -= 1
                past += 1
                at -= KEY.size
            if depth <= SIMILARITY * chars:
                continue
            in_place = 2 * depth >= length
            sharing.append((depth, slot, used, in_place))
            if not in_place:
                continue  # it would overwrite most of the slot's prompt
            clean = past <= IN_PLACE_PAST
            if depth > chosen_depth or (
                depth == chosen_depth
                and (clean, -used) > (chosen_past <= IN_PLACE_PAST, -chosen_used)
            ):
                chosen = slot
                chosen_depth = depth
                chosen_used = used
                chosen_past = past
        if chosen >= 0 and chosen_past > IN_PLACE_PAST:
            # A conversation of several turns past what the request shares with it: where
            # another idle slot shares as much, the one used longest ago of them is taken
            # (its prompt saved first if most of it is overwritten).
            return _used_longest_ago(sharing, chosen, chosen_depth, chosen_used)
        if chosen >= 0:
            return chosen, True, True, chosen_depth
        chosen, depth = _overwritten(sharing)
        if chosen >= 0:
            return chosen, True, False, depth
        return oldest, oldest >= 0 and (oldest_used > 0.0 or in_flight), False, 0

    def begun(self, row: int, generation: int, slot: int) -> None:
        """llama.cpp began answering the request that took ``slot`` of ``row``: it has
        that slot, and a request that names none can no longer be given it."""
        if slot < 0 or slot >= SLOTS or row < 0 or row >= self.rows:
            return
        base = HEADER_SIZE + row * ROW_SIZE
        at = base + ROW.size + slot * RECORD_SIZE + TIMES.size - BUSY.size
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if ROW.unpack_from(self._map, base)[0] == generation:
                busy = BUSY.unpack_from(self._map, at)[0]
                if busy > 0.0:
                    BUSY.pack_into(self._map, at, -busy)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self, row: int, generation: int, slot: int, now: float) -> None:
        """The request that took ``slot`` of ``row`` ended: the slot is idle, used now."""
        if slot < 0 or slot >= SLOTS or row < 0 or row >= self.rows:
            return
        base = HEADER_SIZE + row * ROW_SIZE
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if ROW.unpack_from(self._map, base)[0] == generation:
                TIMES.pack_into(self._map, base + ROW.size + slot * RECORD_SIZE, now, 0.0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def measured(self, row: int, generation: int, slot: int, tokens: int) -> None:
        """The request that took ``slot`` of ``row`` ended with the slot holding
        ``tokens`` (its prompt's and answer's, as llama.cpp's timings count them), if
        it has not been released yet: what llama.cpp saves of it later."""
        if slot < 0 or slot >= SLOTS or row < 0 or row >= self.rows or tokens < 0:
            return
        base = HEADER_SIZE + row * ROW_SIZE
        offset = base + ROW.size + slot * RECORD_SIZE
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if (
                ROW.unpack_from(self._map, base)[0] == generation
                and BUSY.unpack_from(self._map, offset + TIMES.size - BUSY.size)[0]
            ):
                TOKENS.pack_into(self._map, offset + TOKENS_OFFSET, min(tokens, 0xFFFFFFFF))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def unseen(self, row: int, generation: int) -> None:
        """Requests this balancer did not send run on ``row``, and llama.cpp may save what
        it likes to its host cache meanwhile: no saved copy recorded so far is known to
        be kept (saved_since())."""
        if row < 0 or row >= self.rows:
            return
        base = HEADER_SIZE + row * ROW_SIZE
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if ROW.unpack_from(self._map, base)[0] == generation:
                # One token more: a save recorded from now on begins past every stamp
                # given so far.
                saved = SAVED_TOKENS.unpack_from(self._map, base + SAVED_TOKENS_OFFSET)[0] + 1
                SAVED_TOKENS.pack_into(self._map, base + SAVED_TOKENS_OFFSET, saved)
                UNSEEN.pack_into(self._map, base + UNSEEN_OFFSET, saved)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def saved_since(self, row: int, generation: int, saved_at: int) -> int:
        """Tokens of prompts llama.cpp saved to the host cache of the upstream in ``row``
        since the count stood at ``saved_at`` (as take() counts them); -1 where that is
        not known: the row is another upstream's, or requests this balancer did not
        send ran there since (unseen()). (Read without the lock: aligned 8-byte loads.)"""
        if row < 0 or row >= self.rows:
            return -1
        base = HEADER_SIZE + row * ROW_SIZE
        known, _, saved, unseen = ROW.unpack_from(self._map, base)
        if known != generation or saved_at < unseen or saved < saved_at:
            return -1
        since: int = saved - saved_at
        return since

    def held(self, row: int, slot: int) -> list[int]:
        """The prefix keys of the prompt ``slot`` of ``row`` last took (for paddlerctl and
        the tests)."""
        offset = HEADER_SIZE + row * ROW_SIZE + ROW.size + slot * RECORD_SIZE
        count = STATE.unpack_from(self._map, offset)[2]
        return list(KEYS.unpack_from(self._map, offset + STATE.size)[:count])


def _used_longest_ago(
    sharing: list[tuple[int, int, float, bool]], chosen: int, depth: int, used: float
) -> tuple[int, bool, bool, int]:
    """Of ``chosen`` (in place, sharing ``depth`` characters, last ``used``) and the
    idle slots sharing as much, the one used longest ago; named, whether in place, and
    how much it shares."""
    in_place = True
    chosen_depth = depth
    for shared, slot, last, slot_in_place in sharing:
        if shared >= depth and last < used:
            chosen = slot
            used = last
            in_place = slot_in_place
            chosen_depth = shared
    return chosen, True, in_place, chosen_depth


def _overwritten(sharing: list[tuple[int, int, float, bool]]) -> tuple[int, int]:
    """With no slot to go on from in place, the idle slot the request overwrites of those
    sharing a prefix with it (depth, slot, last used, in place), and how much it shares
    (-1, 0: none): the one sharing the most, used longest ago of several. It keeps what
    it shares, and llama.cpp saves its prompt to the host-memory cache first; a slot
    never used would process the whole prompt, and could load nothing from that cache
    (llama.cpp #28139)."""
    chosen = -1
    chosen_depth = 0
    chosen_used = 0.0
    for depth, slot, used, _ in sharing:
        if depth > chosen_depth or (depth == chosen_depth and used < chosen_used):
            chosen = slot
            chosen_depth = depth
            chosen_used = used
    return chosen, chosen_depth
