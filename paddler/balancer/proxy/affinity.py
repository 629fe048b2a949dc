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
popular prompt ends up cached on as many servers as its traffic needs. Among equally
free upstreams, cache_aware takes them in turn, so that new prompts spread over the
fleet's caches instead of all filling the first server's.

Feedback: llama.cpp's timings in each answer say how many prompt tokens came from its
cache (cache_n). A guess that found none counts as a miss; MISSES_TO_FORGET misses in a
row on one upstream mean its cache is not what the index thinks (a restart the agent did
not see, a cache too small for the traffic): everything remembered for it is forgotten.
"""

import itertools
import re
import time
from typing import Any, Final

from paddler.config import BalancerSettings
from paddler.metrics.recorder import Recorder
from paddler.prefixes.index import Holder, PrefixIndex
from paddler.prefixes.keys import prefix_keys, session_key
from paddler.slots import SlotTable, UpstreamRow

MISSES_TO_FORGET: Final = 3
# The policies that send a request where its prefix or session went: they need the index.
REMEMBERING: Final = ("cache_aware", "session")
ANY_IMBALANCE: Final = 1 << 15
_CACHE_N: Final = re.compile(rb'"cache_n"\s*:\s*(\d+)')


class Plan:
    """Where a request would rather go. (A plain class: one is made for every request,
    and compiled a native class costs a fraction of a NamedTuple.) Never changed once
    made: least_busy's requests all share one."""

    __slots__ = ("expected", "imbalance", "keys", "prefer", "ranks", "spread")

    def __init__(
        self,
        keys: list[tuple[int, int]] | None = None,
        prefer: tuple[int, ...] = (),
        imbalance: int = 0,
        ranks: tuple[int, ...] = (),
        expected: tuple[Holder, ...] = (),
        spread: bool = False,
    ) -> None:
        self.keys: list[tuple[int, int]] = [] if keys is None else keys
        self.prefer = prefer
        self.imbalance = imbalance
        self.ranks = ranks
        # The holders of the longest known prefix, still valid (several: the prefix went
        # to several upstreams, each of which may still hold it).
        self.expected = expected
        self.spread = spread  # ties among the least busy taken in turn


_NO_PLAN: Final = Plan()  # least_busy's, for every request


class Affinity:
    def __init__(
        self,
        settings: BalancerSettings,
        table: SlotTable,
        index: PrefixIndex | None,
        recorder: Recorder,
    ) -> None:
        self.policy = settings.routing_policy
        # Whether requests are sent where their prefix or session went before.
        self.remembers = self.policy in REMEMBERING
        self.watches_timings = self.policy == "cache_aware"
        self.session_header = settings.session_header.lower().encode()
        self.imbalance = settings.cache_max_imbalance + 1
        self.table = table
        self.index = index
        self.recorder = recorder
        self._turn = itertools.count()
        self._misses: dict[tuple[int, int], int] = {}

    def plan(self, header: bytes | None, payload: Any) -> Plan:
        if self.policy == "least_busy":
            return _NO_PLAN
        if self.policy == "round_robin":
            return self._round_robin()
        keys: list[tuple[int, int]] = []
        if self.policy == "cache_aware" and isinstance(payload, dict):
            keys = prefix_keys(payload)
        session = header.decode("latin-1") if header else None
        if session is None and isinstance(payload, dict) and isinstance(payload.get("user"), str):
            session = payload["user"]
        if session:
            keys.append((session_key(session), 1 << 30))  # the longest "prefix" of all
        spread = self.policy == "cache_aware"
        if not keys or self.index is None:
            return Plan(keys, spread=spread)
        # Only cache_aware leaves busy holders out: a session sticks to its upstream.
        holders = self.index.holders(keys, now=time.monotonic() if spread else None)
        if not holders:
            return Plan(keys, spread=spread)
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
        return Plan(keys, tuple(rows), self.imbalance, tuple(ranks), tuple(expected), spread)

    def _round_robin(self) -> Plan:
        rows = sorted(row.index for row in self.table.rows())
        if not rows:
            return Plan()
        turn = next(self._turn) % len(rows)
        return Plan(prefer=tuple(rows[turn:] + rows[:turn]), imbalance=ANY_IMBALANCE)

    def expects(self, plan: Plan, row: UpstreamRow) -> bool:
        """Whether ``row``, which the request got a slot on, is where a cache hit was
        expected."""
        for holder in plan.expected:  # noqa: SIM110 - a loop: no generator per request
            if holder.row == row.index:
                return True
        return False

    def holds(self, plan: Plan, row: UpstreamRow, streaming: bool) -> list[int]:
        """``row`` has the request's prompt in its cache now: remember its prefixes.
        cache_aware, for a stream: they are busy there until vacate() gets the keys
        returned. (An answer that is not a stream is whole when its first byte comes:
        its slot is free again at once, and counting it would cost two writes under the
        index's lock for nothing.)"""
        if not plan.keys or self.index is None:
            return []
        now = time.monotonic()
        if plan.spread and streaming:  # cache_aware: every prefix counts the request
            keys = [key for key, _ in plan.keys]
            self.index.remember(keys, row.index, row.generation, row.cache_epoch, now, occupy=True)
            return keys
        # Prefixes it already took need no new write; the rest do.
        known = 0
        for holder in plan.expected:
            if holder.row == row.index:
                known = holder.length
                break
        if plan.keys[-1][1] > known:
            fresh = [key for key, length in plan.keys if length > known]
            self.index.remember(fresh, row.index, row.generation, row.cache_epoch, now)
        return []

    def vacate(self, keys: list[int], row: UpstreamRow) -> None:
        """The request that holds() occupied ``keys`` on ``row`` for has ended."""
        if keys and self.index is not None:
            self.index.vacate(keys, row.index, row.generation)

    def learn(self, expected: bool, row: UpstreamRow, timings: bytes | None) -> None:
        """What llama.cpp's timings say of the guess."""
        if not timings:
            return
        match = _CACHE_N.search(timings)
        if match is None:
            return
        hit = int(match.group(1)) > 0
        self.recorder.cache_guess("none" if not expected else "hit" if hit else "miss")
        if not expected:
            return
        key = (row.index, row.generation)
        if hit:
            self._misses.pop(key, None)
            return
        misses = self._misses.get(key, 0) + 1
        if misses >= MISSES_TO_FORGET:
            self._misses.pop(key, None)
            self.table.forget_cache(row.index, row.generation)
        else:
            if len(self._misses) > 4096:
                self._misses.clear()  # long-gone upstreams: a bound, not a reset rule
            self._misses[key] = misses
