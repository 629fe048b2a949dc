"""Where a request that takes a slot would rather go, by the balancer's routing policy.

- least_busy: nowhere in particular; the slot table picks the most free slots.
- cache_aware: the upstream that last took the longest prefix of the request's prompt
  (paddler/prefixes), whose KV cache most likely still holds it; a session key (the
  session header, or the request's user field) counts as the longest prefix of all.
- session: the upstream its session went to last.
- round_robin: the next upstream in turn that has a free slot.

The slot table takes the preferred upstream only while it has a free slot and is not
more than cache_max_imbalance free slots busier than the least busy one.

cache_aware counts, per prefix and upstream, the requests in flight with it (the
prefix index): llama.cpp keeps a prompt in the KV cache of the one slot that processed
it, so while a request runs there, another with the same prefix would process it again
on another slot of the same server, sharing its compute. Such a holder is left out, and
the request goes to the least busy upstream, which then holds the prefix as well: a
popular prompt ends up cached on as many servers as its traffic needs. Unless the
holder has another copy: a new conversation that branched off a shared system prompt
where a much longer one ran had llama.cpp save that one to its host-memory cache
first (paddler/prefixes/index.py); and llama.cpp saves every idle slot's prompt there as
another task starts (paddler/prefixes/slots.py: _save_idle). Those count while
requests sent to them keep finding them cached (the copy trust), the latter while
requests that rely on llama.cpp's host cache find what they expect there (the host
trust: a request given a slot llama.cpp refills from its host cache, as the slot
record says, where the prefix expected on the upstream is in no slot).

Among equally free upstreams, cache_aware takes the one given a request longest ago,
so that new prompts spread over the fleet's caches instead of all filling the first
server's.

When the only holders of a request's longest prefix are busy, cache_aware may wait for
one of them instead (cache_max_wait): at most as long as processing the prompt's uncached
part elsewhere is expected to take, learned from llama.cpp's timings (seconds of prefill
per prompt character, a moving average kept in the prefix index, shared by every worker).
Taking an idle slot elsewhere costs that whole prefill for sure, and slows whatever else
runs on that server; the busy holder's answer may end in a moment.

cache_aware also names the slot a completion request takes on its upstream (llama.cpp's
id_slot; paddler/prefixes/slots.py): left to itself, llama.cpp gives a new conversation
the first of the idle slots that share its system prompt, by slot number, which may be
that of a conversation still going rather than of one that ended.

Feedback: llama.cpp's timings in each answer say how many prompt tokens came from its
cache (cache_n). A guess that found none counts as a miss; MISSES_TO_FORGET misses in a
row on one upstream mean its cache is not what the index thinks (a restart the agent did
not see, a cache too small for the traffic): everything remembered for it is forgotten.
"""

import asyncio
import itertools
import re
import time
from typing import Any, Final

from paddler.balancer.proxy.timings import PromptTimings
from paddler.config import BalancerSettings
from paddler.metrics.recorder import Recorder
from paddler.prefixes.index import HOST_HEADROOM, Holder, PrefixIndex
from paddler.prefixes.keys import BLOCK, LIMIT, prefix_keys, session_key
from paddler.prefixes.slots import SlotContents
from paddler.slots import SlotTable, UpstreamRow

MISSES_TO_FORGET: Final = 3
TRUST_RATE: Final = 0.25  # weight of each request measured, in the copy and host trusts
# The policies that send a request where its prefix or session went: they need the index.
REMEMBERING: Final = ("cache_aware", "session")
ANY_IMBALANCE: Final = 1 << 15
SESSION_LENGTH: Final = 1 << 30  # a session key's "length": longer than any prefix
# Prefill timed over fewer tokens says little about the rate.
TOKENS_TO_LEARN: Final = 32
LEARNING_RATE: Final = 0.1  # weight of each new measurement of the prefill rate
HOLDER_POLL: Final = 0.01  # seconds between looks at a busy holder
# llama.cpp puts a request that names its slot (id_slot) through the same prompt-cache
# logic as one that does not, saving the slot's prompt to its host-memory cache before
# overwriting most of it, from this build on at the latest (b9670 did not: llama.cpp
# #24746). On older builds a named slot would lose that, so none is named there. A
# build that gives no number (b0-unknown: built from a source archive) counts as new.
PINNING_BUILD: Final = 10644
_BUILD: Final = re.compile(r"b(\d+)")


class Plan:
    """Where a request would rather go. (A plain class: one is made for every request,
    and compiled a native class costs a fraction of a NamedTuple.) Never changed once
    made: least_busy's requests all share one."""

    __slots__ = (
        "chars",
        "end",
        "expected",
        "imbalance",
        "keys",
        "prefer",
        "ranks",
        "saves",
        "spread",
        "waits",
    )

    def __init__(
        self,
        keys: list[tuple[int, int]] | None = None,
        prefer: tuple[int, ...] = (),
        imbalance: int = 0,
        ranks: tuple[int, ...] = (),
        expected: tuple[Holder, ...] = (),
        spread: bool = False,
        waits: tuple[Holder, ...] = (),
        saves: int = 0,
        end: int = 0,
    ) -> None:
        self.keys: list[tuple[int, int]] = [] if keys is None else keys
        self.prefer = prefer
        self.imbalance = imbalance
        self.ranks = ranks
        # The holders of the longest known prefix, still valid (several: the prefix went
        # to several upstreams, each of which may still hold it).
        self.expected = expected
        self.spread = spread  # ties: the least recently chosen, not the first
        # Busy holders of a longer prefix than any idle one, and how many characters
        # more of the prompt they hold: what waiting for one of them would save.
        self.waits = waits
        self.saves = saves
        # The key a next turn of the prompt would share with it (continued_at()).
        self.end = end
        # The prompt's length as its prefix keys count it (a session key does not).
        self.chars = 0
        for _, length in reversed(self.keys):
            if length < SESSION_LENGTH:
                self.chars = length
                break


_NO_PLAN: Final = Plan()  # least_busy's, for every request


class Affinity:
    def __init__(
        self,
        settings: BalancerSettings,
        table: SlotTable,
        index: PrefixIndex | None,
        recorder: Recorder,
        contents: SlotContents | None = None,
    ) -> None:
        self.policy = settings.routing_policy
        # Whether requests are sent where their prefix or session went before.
        self.remembers = self.policy in REMEMBERING
        self.watches_timings = self.policy == "cache_aware"
        self.session_header = settings.session_header.lower().encode()
        self.max_wait = settings.cache_max_wait
        self.imbalance = settings.cache_max_imbalance + 1
        self.table = table
        self.index = index
        self.recorder = recorder
        self._turn = itertools.count()
        self._misses: dict[tuple[int, int], int] = {}
        # Given by the proxy when requests name their slot (config.model.names_slots).
        self.contents = contents
        self.pins = contents is not None
        self._pinning_builds: dict[str, bool] = {}

    def plan(self, header: bytes | None, payload: Any) -> Plan:
        if self.policy == "least_busy":
            return _NO_PLAN
        if self.policy == "round_robin":
            return self._round_robin()
        keys: list[tuple[int, int]] = []
        end = 0
        if self.policy == "cache_aware" and isinstance(payload, dict):
            keys = prefix_keys(payload)
            end = continued_at(keys, isinstance(payload.get("messages"), list))
        session = header.decode("latin-1") if header else None
        if session is None and isinstance(payload, dict) and isinstance(payload.get("user"), str):
            session = payload["user"]
        if session:
            keys.append((session_key(session), SESSION_LENGTH))  # the longest "prefix"
        return self._planned(keys, self.policy == "cache_aware", end)

    def _planned(self, keys: list[tuple[int, int]], spread: bool, end: int) -> Plan:
        if not keys or self.index is None:
            return Plan(keys, (), 0, (), (), spread, (), 0, end)
        # Only cache_aware leaves busy holders out: a session sticks to its upstream.
        busy: list[Holder] | None = [] if spread and self.max_wait > 0 else None
        # (Positional arguments: compiled, a call with keywords costs more.)
        now = time.monotonic() if spread else None
        holders = self.index.holders(keys, 4, now, busy, self._kept)
        if not holders and not busy:
            return Plan(keys, (), 0, (), (), spread, (), 0, end)
        table = self.table
        rows: list[int] = []
        ranks: list[int] = []
        expected: list[Holder] = []
        for holder in holders:
            if table.unchanged_since(holder.row, holder.generation, holder.epoch):
                rows.append(holder.row)
                ranks.append(holder.rank)
                if holder.rank == ranks[0]:
                    expected.append(holder)
        waits: tuple[Holder, ...] = ()
        saves = 0
        if busy and busy[0].length < SESSION_LENGTH and self.seconds_per_char > 0:
            # (Not for a session's key: a client's concurrent requests of one session
            # would wait for each other. Nor before any prefill was measured.)
            idle = expected[0].length if expected else 0
            if busy[0].length > idle:
                waits = tuple(
                    holder
                    for holder in busy
                    if table.unchanged_since(holder.row, holder.generation, holder.epoch)
                )
                saves = busy[0].length - idle if waits else 0
        return Plan(
            keys,
            tuple(rows),
            self.imbalance,
            tuple(ranks),
            tuple(expected),
            spread,
            waits,
            saves,
            end,
        )

    def _kept(self, row: int, generation: int, saved_at: int) -> bool:
        """Whether llama.cpp's host cache still keeps a copy of a prefix saved on ``row``
        when ``saved_at`` tokens had been saved there: what the upstream saved since
        (as the slot record counts it) leaves room for it, with HOST_HEADROOM to spare,
        in a host cache of the size its agent reported."""
        contents = self.contents
        capacity = self.table.host_cache_tokens(row)  # (0: none, or unknown)
        if contents is None or capacity <= 0 or self.table.foreign_busy(row):
            return False  # (other clients' requests there now: their saves are unseen)
        saved = contents.saved_since(row, generation, saved_at)
        return 0 <= saved <= HOST_HEADROOM * capacity

    @property
    def seconds_per_char(self) -> float:
        """Seconds of prefill per prompt character, as llama.cpp's timings measure it
        (kept in the prefix index, for every worker); 0 until measured, and no request
        waits for a busy holder until then."""
        return 0.0 if self.index is None else self.index.prefill_rate

    def wait_budget(self, plan: Plan) -> float:
        """How long ``plan``'s request may wait for a busy holder of its prefix."""
        if not plan.waits:
            return 0.0
        return min(self.max_wait, self.seconds_per_char * plan.saves)

    async def wait_for_holder(self, plan: Plan) -> Plan:
        """Wait, within wait_budget(), until a busy holder of the request's prefix is
        free again; the plan as it stands then. A wait is counted by its outcome."""
        started = time.monotonic()
        budget = self.wait_budget(plan)
        deadline = started + budget
        while plan.waits:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(HOLDER_POLL, left))
            plan = self._planned(plan.keys, plan.spread, plan.end)
        if budget > 0:
            outcome = "expired" if plan.waits else "freed"
            self.recorder.holder_wait(outcome, time.monotonic() - started)
        return plan

    def _round_robin(self) -> Plan:
        rows = sorted(row.index for row in self.table.rows())
        if not rows:
            return Plan()
        turn = next(self._turn) % len(rows)
        return Plan(prefer=tuple(rows[turn:] + rows[:turn]), imbalance=ANY_IMBALANCE)

    def expects(self, plan: Plan, row: UpstreamRow) -> bool:
        """Whether ``row``, which the request got a slot on, is where a cache hit was
        expected."""
        return _held_on(plan, row) > 0

    def occupy_held(self, plan: Plan, row: UpstreamRow, occupied: list[int]) -> int:
        """cache_aware, a stream sent to ``row`` because it holds the request's prefix:
        that copy is in use from now, while the prompt's rest is read, not only from
        the first token on. (Counted from the first token, a second request with the
        same prefix arriving meanwhile went to the same server, found its one copy in
        use and processed the whole prompt on the other slot: bench W2.) The keys go
        to ``occupied``, until vacate(); the length of prefix they cover is returned."""
        if self.index is None:
            return 0
        held = _held_on(plan, row)
        keys = [key for key, length in plan.keys if length <= held]
        if keys:
            now = time.monotonic()
            self.index.remember(keys, row.index, row.generation, row.cache_epoch, now, True)
            occupied.extend(keys)
        return held

    def holds(self, plan: Plan, row: UpstreamRow, streaming: bool, early: int) -> list[int]:
        """``row`` has the request's prompt in its cache now: remember its prefixes.
        cache_aware, for a stream: they are busy there until vacate() gets the keys
        returned (those up to ``early`` characters are already, by occupy_held()). (An
        answer that is not a stream is whole when its first byte comes: its slot is
        free again at once, and counting it would cost two writes under the index's
        lock for nothing.)"""
        if not plan.keys or self.index is None:
            return []
        now = time.monotonic()
        holder = _holder_on(plan, row)
        known = 0 if holder is None else holder.length
        held: list[int] | None = None
        # (Not a copy more from a spare copy: llama.cpp moves that copy from its host
        # cache into the slot the request takes.)
        branches = holder is None or not holder.spare
        if plan.spread and 0 < known < SESSION_LENGTH and plan.chars > known:
            # cache_aware: the prompt goes on past what the row holds, continuing the
            # prompt that ended there or branching off (a copy more of what it held).
            held = [key for key, length in plan.keys if length <= known]
        if plan.spread and streaming:  # cache_aware: every prefix counts the request
            keys = [key for key, length in plan.keys if length > early]
            if keys:
                self.index.remember(
                    keys,
                    row.index,
                    row.generation,
                    row.cache_epoch,
                    now,
                    True,
                    plan.end,
                    held,
                    known,
                    plan.chars,
                    branches,
                )
            return keys
        # Prefixes it already took need no new write; the rest do.
        if plan.keys[-1][1] > known:
            fresh = [key for key, length in plan.keys if length > known]
            self.index.remember(
                fresh,
                row.index,
                row.generation,
                row.cache_epoch,
                now,
                False,
                plan.end,
                held,
                known,
                plan.chars,
                branches,
            )
        return []

    def pin(
        self, plan: Plan, row: UpstreamRow, hosted: list[bool] | None = None
    ) -> tuple[int, bool]:
        """The slot of ``row`` that the request takes, as the slot record has it
        (paddler/prefixes/slots.py; -1: none), and whether to name it. None on an
        upstream that runs requests this balancer did not send (the record cannot know
        what they did to its slots), nor on a build that would skip its prompt cache for
        a named slot. Given ``hosted``, whether the request relies on llama.cpp's host
        cache is added to it (for learn()): most of the prefix expected on ``row`` is in
        no slot but there, and the slot is one llama.cpp refills from there."""
        contents = self.contents
        if contents is None or not self._pinning_build(row.build):
            return -1, False
        if row.foreign_busy:
            # Other clients' requests run there: what llama.cpp saves meanwhile is unseen.
            contents.unseen(row.index, row.generation)
            return -1, False
        keys = plan.keys
        if keys and keys[-1][1] >= SESSION_LENGTH:
            keys = keys[:-1]  # a session's key is no prefix of the prompt
        saved: list[int] = []
        refilled: list[int] = []
        saved_at: list[int] = []
        taken = contents.take(
            row.index,
            row.generation,
            row.cache_epoch,
            row.slots_total,
            keys,
            plan.chars,
            time.monotonic(),
            saved,
            refilled,
            saved_at,
            self._tokens_of(plan.chars),
        )
        if saved and saved_at and self.index is not None:
            self.index.saved(saved, row.index, row.generation, row.cache_epoch, saved_at[0])
        if hosted is not None:
            holder = _holder_on(plan, row)
            shared = refilled[0] if refilled else -1
            hosted.append(
                holder is not None
                and holder.whole  # (else llama.cpp would not load it from there)
                and holder.length < SESSION_LENGTH
                and 0 <= 2 * shared < holder.length
            )
        return taken

    def _tokens_of(self, chars: int) -> int:
        """The tokens of a prompt ``chars`` long, as learned (as many as its characters
        until measured: more than most tokenizers make of them)."""
        ratio = 0.0 if self.index is None else self.index.tokens_per_char
        return int(chars * ratio) if ratio > 0 else chars

    def measured(self, row: UpstreamRow, slot: int, timings: PromptTimings) -> None:
        """The request that pin() gave ``slot`` of ``row`` ended with these timings: the
        tokens the slot holds now, for the slot record (what llama.cpp saves of it)."""
        if self.contents is not None:
            self.contents.measured(row.index, row.generation, slot, timings.slot_tokens)

    def begun(self, row: UpstreamRow, slot: int) -> None:
        """llama.cpp began answering the request that pin() gave ``slot`` of ``row``."""
        if self.contents is not None:
            self.contents.begun(row.index, row.generation, slot)

    def unpin(self, row: UpstreamRow, slot: int) -> None:
        """The request that pin() gave ``slot`` of ``row`` (named or not) ended."""
        if self.contents is not None:
            self.contents.release(row.index, row.generation, slot, time.monotonic())

    def _pinning_build(self, build: str) -> bool:
        known = self._pinning_builds.get(build)
        if known is None:
            match = _BUILD.match(build)
            number = int(match.group(1)) if match else 0
            known = number == 0 or number >= PINNING_BUILD
            if len(self._pinning_builds) > 64:
                self._pinning_builds.clear()  # a bound, not a rule
            self._pinning_builds[build] = known
        return known

    def vacate(self, keys: list[int], row: UpstreamRow) -> None:
        """The request that holds() occupied ``keys`` on ``row`` for has ended."""
        if keys and self.index is not None:
            self.index.vacate(keys, row.index, row.generation)

    def learn(
        self,
        plan: Plan,
        expected: bool,
        row: UpstreamRow,
        timings: PromptTimings,
        hosted: bool = False,
    ) -> None:
        """What llama.cpp's timings say of the guess, and of how long prefill takes;
        ``hosted``: pin() said the request relies on llama.cpp's host cache."""
        cached = timings.cached
        processed = timings.processed
        hit = cached > 0
        chars = plan.chars
        holder = _holder_on(plan, row)
        spare = holder is not None and holder.spare
        if processed >= 0 and chars > 0 and self.index is not None:
            branch = spare and holder is not None and not holder.saved
            if (branch or hosted) and holder is not None and chars < LIMIT:
                # (Not past LIMIT: the tokens count the whole prompt, chars only LIMIT.)
                # Sent to a copy beyond the first, or to a slot refilled from the host
                # cache: found if most of the prefix expected there came from cache (in
                # tokens: the prompt's, per character). A request sent to a saved copy
                # but given the holder's own slot (it freed meanwhile) measures nothing.
                wanted = holder.length * (processed + cached) / chars
                found = 1.0 if 2 * cached >= wanted else 0.0
                if branch:
                    trust = self.index.copy_trust
                    self.index.copy_trust = trust + TRUST_RATE * (found - trust)
                else:
                    trust = self.index.host_trust
                    self.index.host_trust = trust + TRUST_RATE * (found - trust)
            self._learn_rates(timings, chars)
        self.recorder.cache_guess("none" if not expected else "hit" if hit else "miss")
        if not expected:
            return
        key = (row.index, row.generation)
        if hit:
            self._misses.pop(key, None)
            return
        if spare:
            # A spare copy missing says the host cache is small, which the copy trust
            # learns; not that the upstream lost its cache.
            return
        misses = self._misses.get(key, 0) + 1
        if misses >= MISSES_TO_FORGET:
            self._misses.pop(key, None)
            self.table.forget_cache(row.index, row.generation)
        else:
            if len(self._misses) > 4096:
                self._misses.clear()  # long-gone upstreams: a bound, not a reset rule
            self._misses[key] = misses

    def _learn_rates(self, timings: PromptTimings, chars: int) -> None:
        """What a request's timings say of prompt tokens per character (below LIMIT:
        the tokens count the whole prompt, chars only LIMIT) and of seconds of prefill
        per character."""
        index = self.index
        if index is None:
            return
        processed = timings.processed
        cached = timings.cached
        if chars < LIMIT and processed + cached >= TOKENS_TO_LEARN:
            ratio = (processed + cached) / chars
            known = index.tokens_per_char
            index.tokens_per_char = ratio if not known else known + LEARNING_RATE * (ratio - known)
        if processed >= TOKENS_TO_LEARN:
            # Seconds per token processed, times tokens per character of prompt.
            rate = timings.seconds / processed * (processed + cached) / chars
            known = index.prefill_rate
            if 0.0 < rate < 1.0:  # (not NaN, nor a second a character)
                index.prefill_rate = rate if not known else known + LEARNING_RATE * (rate - known)


def continued_at(keys: list[tuple[int, int]], chat: bool) -> int:
    """The key a next turn of this prompt would share with it: a chat's last message's;
    a plain prompt's last whole block (its last, partial one is keyed at a length that
    no longer prompt is keyed at). 0: none."""
    for key, length in reversed(keys):
        if chat or length % BLOCK == 0:
            return key
    return 0


def _holder_on(plan: Plan, row: UpstreamRow) -> Holder | None:
    """The holder the request was expected to find its prefix on at ``row``, if any."""
    for holder in plan.expected:  # a loop: no generator per request
        if holder.row == row.index:
            return holder
    return None


def _held_on(plan: Plan, row: UpstreamRow) -> int:
    """How long a prefix of the request ``row`` was expected to hold (0: none)."""
    holder = _holder_on(plan, row)
    return 0 if holder is None else holder.length
