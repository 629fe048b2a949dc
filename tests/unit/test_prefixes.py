"""Cache-aware routing's parts: prefix keys, the shared prefix index, preferred rows."""

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from paddler.balancer.proxy.affinity import LEARNING_RATE, Affinity, Plan
from paddler.balancer.proxy.timings import PromptTimings, prompt_timings
from paddler.config import BalancerSettings
from paddler.metrics.counters import CounterFile
from paddler.metrics.recorder import Recorder
from paddler.prefixes.index import (
    BUSY_HORIZON,
    HOST_START,
    HOST_TRUSTED,
    PROBE_EVERY,
    TRUSTED,
    WAYS,
    Holder,
    PrefixIndex,
)
from paddler.prefixes.keys import BLOCK, LIMIT, MAX_KEYS, prefix_keys, session_key
from paddler.prefixes.slots import SlotContents
from paddler.slots import SlotTable, UpstreamState
from paddler.slots.layout import UNLIMITED_HOST_CACHE
from paddler.slots.policy import Policy
from tests.unit.test_slot_table import REPORT as SLOT_TABLE_REPORT

# The slot table's tests' report, with 2 slots as in the test fleets.
REPORT = replace(SLOT_TABLE_REPORT, slots_total=2, slots_idle=2)


def chat(*contents: str) -> dict[str, object]:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]}


def test_a_conversation_s_next_turn_extends_the_keys_of_the_last() -> None:
    first = prefix_keys(chat("be brief", "hello"))
    second = prefix_keys(chat("be brief", "hello", "hi there", "how are you?"))
    assert len(first) == 2
    assert len(second) == 4
    assert second[:2] == first  # the same prefixes, the same keys
    assert [length for _, length in second] == sorted(length for _, length in second)
    other = prefix_keys(chat("be brief", "goodbye"))
    assert other[0] == first[0]  # the shared system prompt
    assert other[1] != first[1]
    # OpenAI's content parts count as their text.
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}]}
    assert prefix_keys(parts)[0] == first[0]


def test_plain_prompts_are_cut_in_blocks_and_bounded() -> None:
    keys = prefix_keys({"prompt": "x" * (3 * BLOCK + 10)})
    assert [length for _, length in keys] == [BLOCK, 2 * BLOCK, 3 * BLOCK, 3 * BLOCK + 10]
    huge = prefix_keys({"prompt": "y" * (4 * LIMIT)})
    assert len(huge) == MAX_KEYS
    assert huge[-1][1] == LIMIT  # nothing past the limit is hashed
    assert prefix_keys({"input": "no prompt here"}) == []
    assert prefix_keys({"messages": "not a list", "prompt": 7}) == []
    assert session_key("user-1") == session_key("user-1") != session_key("user-2")


def test_the_index_names_the_last_holder_of_the_longest_prefix(tmp_path: Path) -> None:
    index = PrefixIndex.create(tmp_path / "prefixes", sets=64)
    keys = prefix_keys(chat("be brief", "hello", "hi there", "how are you?"))
    index.remember([key for key, _ in keys[:2]], row=3, generation=7, epoch=1, now=10.0)
    index.remember([key for key, _ in keys[:1]], row=5, generation=2, epoch=0, now=11.0)
    (first, second) = index.holders(keys)
    assert (first.row, first.generation, first.epoch, first.length) == (3, 7, 1, keys[1][1])
    assert (second.row, second.length) == (5, keys[0][1])
    assert (first.rank, second.rank) == (0, 1)
    assert index.holders(prefix_keys(chat("something else"))) == []
    # A prefix sent to two upstreams is held by both, as good as each other.
    index.remember([key for key, _ in keys[:2]], row=5, generation=2, epoch=0, now=12.0)
    both = index.holders(keys)
    assert sorted((h.row, h.rank) for h in both) == [(3, 0), (5, 0)]
    # Another process sees the same.
    other = PrefixIndex.open(tmp_path / "prefixes")
    assert other.holders(keys[:2], most=1)[0].row == 3


def test_a_full_set_forgets_the_prefix_used_longest_ago(tmp_path: Path) -> None:
    index = PrefixIndex.create(tmp_path / "prefixes", sets=1)  # every key in one set
    for key in range(1, WAYS + 1):
        index.remember([key], row=key, generation=1, epoch=0, now=float(key))
    index.remember([1], row=1, generation=1, epoch=0, now=100.0)  # 1 is used again
    index.remember([99], row=9, generation=1, epoch=0, now=101.0)
    assert index.find(2) == []  # the oldest went
    assert index.find(1) == [(1, 1, 0)]
    assert index.find(99) == [(9, 1, 0)]


def test_a_preferred_row_is_taken_within_the_imbalance(tmp_path: Path) -> None:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    table.apply_report(REPORT, now=100.0)
    table.apply_report(replace(REPORT, agent_id="a2", name="gpu1", port=8082), now=100.0)
    table.join()
    gpu1 = next(row.index for row in table.rows() if row.name == "gpu1")
    # Both free: the preferred one, though the least busy would be the first.
    taken = table.acquire(0, Policy(100.5, 3, prefer=(gpu1,), imbalance=1))
    assert taken is not None
    assert taken[1].name == "gpu1"
    # gpu1 now has 1 free slot, gpu0 2: within an imbalance of 1 (allowing 1 fewer)...
    again = table.acquire(0, Policy(100.5, 3, prefer=(gpu1,), imbalance=2))
    assert again is not None
    assert again[1].name == "gpu1"
    # ...full now: the least busy takes it.
    full = table.acquire(0, Policy(100.5, 3, prefer=(gpu1,), imbalance=2))
    assert full is not None
    assert full[1].name == "gpu0"
    table.release(again[0])
    # 1 free on gpu1, 1 on gpu0: no imbalance at all is allowed with imbalance=1 here.
    stay = table.acquire(0, Policy(100.5, 3, prefer=(gpu1,), imbalance=1))
    assert stay is not None
    assert stay[1].name == "gpu1"


def test_among_holders_of_the_same_prefix_the_least_busy_is_taken(tmp_path: Path) -> None:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    for number in range(3):
        report = replace(REPORT, agent_id=f"a{number}", name=f"gpu{number}", port=8081 + number)
        table.apply_report(replace(report, slots_total=4, slots_idle=4), now=100.0)
    table.join()
    rows = {row.name: row.index for row in table.rows()}
    busy = table.acquire(0, Policy(100.5, 3, prefer=(rows["gpu1"],), imbalance=1))
    assert busy is not None
    assert busy[1].name == "gpu1"
    # gpu1 and gpu2 both hold the longest prefix (rank 0), gpu0 a shorter one (rank 1):
    # the least busy of the two holders, not gpu0 though it is as free.
    both = Policy(
        100.5,
        3,
        prefer=(rows["gpu1"], rows["gpu2"], rows["gpu0"]),
        imbalance=5,
        ranks=(0, 0, 1),
    )
    taken = table.acquire(0, both)
    assert taken is not None
    assert taken[1].name == "gpu2"
    # Both holders now as busy: the one given a request longest ago (gpu1, at 100.5).
    later = Policy(
        101.0, 3, prefer=(rows["gpu2"], rows["gpu1"], rows["gpu0"]), imbalance=5, ranks=(0, 0, 1)
    )
    tied = table.acquire(0, later)
    assert tied is not None
    assert tied[1].name == "gpu1"


def test_an_upstream_that_may_have_lost_its_cache_moves_to_a_new_epoch(tmp_path: Path) -> None:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    table.apply_report(REPORT, now=100.0)
    (row,) = table.rows()
    epoch = row.cache_epoch
    table.apply_report(replace(REPORT, sequence=2, slots_idle=1, slots_processing=1), now=101.0)
    assert table.rows()[0].cache_epoch == epoch  # reports while ready change nothing
    table.apply_report(replace(REPORT, sequence=3, state=UpstreamState.UNREACHABLE), now=102.0)
    table.apply_report(replace(REPORT, sequence=4), now=103.0)
    after_restart = table.rows()[0].cache_epoch
    assert after_restart != epoch
    table.forget_cache(row.index, row.generation)
    assert table.rows()[0].cache_epoch != after_restart
    assert table.cache_epochs() == [table.rows()[0].cache_epoch]
    table.forget_cache(row.index, row.generation + 1)  # an old row's: ignored
    assert table.cache_epochs() == [table.rows()[0].cache_epoch]


def test_a_holder_busy_with_the_prefix_is_not_offered_until_its_request_ends(
    tmp_path: Path,
) -> None:
    index = PrefixIndex.create(tmp_path / "prefixes", sets=64)
    first = prefix_keys(chat("be brief", "hello"))
    second = prefix_keys(chat("be brief", "goodbye"))  # the same system prompt
    index.remember([key for key, _ in first], row=3, generation=7, epoch=1, now=10.0, occupy=True)
    # The system prompt's only copy on row 3 is in the slot of the request in flight.
    assert index.holders(second, now=11.0) == []
    assert [h.row for h in index.holders(second)] == [3]  # without now: busy is not asked
    # Meanwhile it went to row 5 as well, and ended there: row 5 is offered.
    index.remember([key for key, _ in second], row=5, generation=2, epoch=0, now=12.0, occupy=True)
    index.vacate([key for key, _ in second], row=5, generation=2)
    assert [(h.row, h.length) for h in index.holders(second, now=13.0)] == [(5, second[1][1])]
    # The first request ends: both hold the system prompt, row 5 its longer prefix.
    index.vacate([key for key, _ in first], row=3, generation=7)
    held = index.holders(second, now=14.0)
    assert [(h.row, h.rank) for h in held] == [(5, 0), (3, 1)]
    # Two in flight on one row need two ends.
    index.remember([first[0][0]], row=3, generation=7, epoch=1, now=15.0, occupy=True)
    index.remember([first[0][0]], row=3, generation=7, epoch=1, now=15.0, occupy=True)
    index.vacate([first[0][0]], row=3, generation=7)
    assert index.in_flight(first[0][0], 3) == 1
    index.vacate([first[0][0]], row=3, generation=7)
    index.vacate([first[0][0]], row=3, generation=7)  # one end too many: stays at 0
    assert index.in_flight(first[0][0], 3) == 0


def test_a_count_left_by_a_dead_worker_stops_counting_after_the_horizon(tmp_path: Path) -> None:
    index = PrefixIndex.create(tmp_path / "prefixes", sets=64)
    keys = prefix_keys(chat("be brief", "hello"))
    index.remember([key for key, _ in keys], row=3, generation=7, epoch=1, now=10.0, occupy=True)
    # Nobody vacates: the worker that sent it was SIGKILLed.
    assert index.holders(keys, now=10.0 + BUSY_HORIZON - 1) == []
    assert [h.row for h in index.holders(keys, now=10.0 + BUSY_HORIZON)] == [3]
    # Taken again later, it counts from zero, not from what was left behind.
    index.remember([keys[0][0]], row=3, generation=7, epoch=1, now=20.0 + BUSY_HORIZON, occupy=True)
    assert index.in_flight(keys[0][0], 3) == 1
    # A row given to another upstream (a new generation) starts from zero too.
    index.remember([keys[1][0]], row=3, generation=8, epoch=0, now=21.0, occupy=True)
    assert index.in_flight(keys[1][0], 3) == 1


def test_cache_aware_takes_the_equally_free_upstream_chosen_longest_ago(tmp_path: Path) -> None:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    for number in range(2):
        report = replace(REPORT, agent_id=f"a{number}", name=f"gpu{number}", port=8081 + number)
        table.apply_report(report, now=100.0)
    table.join()
    # Another worker's handle on the same table: what one chose, the other sees.
    other = SlotTable.open(table.path)
    other.join()
    spreading = []
    for step, handle in enumerate([table, other, table]):
        taken = handle.acquire(0, Policy(100.1 + step / 10, 3, spread=True))
        assert taken is not None
        spreading.append(taken[1].name)
        handle.release(taken[0])
    assert spreading == ["gpu0", "gpu1", "gpu0"]
    # One request on each: the next goes where its own started longest ago, likely past
    # its prefill, whichever worker sent it and whichever row comes first.
    on_gpu1 = other.acquire(0, Policy(101.0, 3, spread=True))
    on_gpu0 = table.acquire(0, Policy(101.1, 3, spread=True))
    assert on_gpu1 is not None
    assert on_gpu1[1].name == "gpu1"
    assert on_gpu0 is not None
    assert on_gpu0[1].name == "gpu0"
    third = table.acquire(0, Policy(101.2, 3, spread=True))
    assert third is not None
    assert third[1].name == "gpu1"
    for reservation in (on_gpu1[0], on_gpu0[0], third[0]):
        table.release(reservation)
    # least_busy keeps the first of equals.
    first = []
    for _ in range(2):
        taken = table.acquire(0, Policy(100.5, 3))
        assert taken is not None
        first.append(taken[1].name)
        table.release(taken[0])
    assert len(set(first)) == 1


def test_busy_holders_of_a_longer_prefix_than_any_idle_one_are_reported(tmp_path: Path) -> None:
    index = PrefixIndex.create(tmp_path / "prefixes", sets=64)
    first = prefix_keys(chat("be brief", "hello"))
    second = prefix_keys(chat("be brief", "goodbye"))  # the same system prompt
    index.remember([key for key, _ in first], row=3, generation=7, epoch=1, now=10.0, occupy=True)
    busy: list[Holder] = []
    assert index.holders(second, now=11.0, busy=busy) == []
    assert [(h.row, h.generation, h.epoch, h.length) for h in busy] == [(3, 7, 1, second[0][1])]
    # An idle copy of the same prefix elsewhere: found, and the busy one not reported.
    index.remember([second[0][0]], row=5, generation=2, epoch=0, now=12.0)
    busy.clear()
    assert [h.row for h in index.holders(second, now=13.0, busy=busy)] == [5]
    assert busy == []
    # A busy copy of the longer prefix, an idle one of the shorter: both said.
    busy.clear()
    held = index.holders(first, now=14.0, busy=busy)
    assert [(h.row, h.length) for h in held] == [(5, first[0][1])]
    assert [(h.row, h.length) for h in busy] == [(3, first[1][1])]


BRIEF = "be brief " * 30  # a system prompt over a quarter of the conversations after it


def test_a_prefix_that_prompts_branched_off_on_a_row_has_a_copy_for_each(
    tmp_path: Path,
) -> None:
    index = PrefixIndex.create(tmp_path / "prefixes", sets=64)

    def send(keys: list[tuple[int, int]], row: int, known: int = 0) -> None:
        """A prompt of ``keys`` sent to ``row``, which held it up to ``known``."""
        held = [key for key, length in keys if length <= known] or None
        fresh = [key for key, length in keys if length > known]
        index.remember(fresh, row, 7, 1, 10.0, False, keys[-1][0], held, known, keys[-1][1])

    alice = prefix_keys(chat(BRIEF, "tell me a long story " * 20))
    send(alice, 3)
    assert [index.copies(key, 3) for key, _ in alice] == [1, 1]
    # Alice's next turn continues her prompt, in its slot: no copy of anything more.
    again = prefix_keys(chat(BRIEF, "tell me a long story " * 20, "Once...", "Go on."))
    assert again[:2] == alice
    send(again, 3, alice[1][1])
    assert [index.copies(key, 3) for key, _ in again] == [1, 1, 1, 1]
    # Bob's conversation begins with the same system prompt, where Alice's, far longer,
    # went on: llama.cpp saves hers to its host cache before reusing her slot, so row 3
    # has the system prompt twice.
    bob = prefix_keys(chat(BRIEF, "good day"))
    send(bob, 3, bob[0][1])
    assert index.copies(bob[0][0], 3) == 2
    # Not where the prompt that went on is over four times the prefix: llama.cpp loads
    # nothing from its host cache for a request sharing less than a quarter of a prompt.
    tiny = prefix_keys(chat("be brief", "tell me a long story " * 20))
    send(tiny, 5)
    send(prefix_keys(chat("be brief", "good day")), 5, tiny[0][1])
    assert index.copies(tiny[0][0], 5) == 1
    assert index.copies(again[1][0], 3) == 1
    # A group's second question after a long system prompt keeps most of the first's
    # slot: reused in place, no copy saved.
    rules = "answer as a pirate would " * 40
    first = prefix_keys(chat(rules, "why is the sea salty?"))
    send(first, 4)
    send(prefix_keys(chat(rules, "how deep is it?")), 4, first[0][1])
    assert index.copies(first[0][0], 4) == 1
    # Not for another upstream in the row, nor after its cache epoch moved.
    index.remember([], 3, 8, 1, 11.6, False, 0, [bob[0][0]], bob[0][1], 10_000)
    index.remember([], 3, 7, 2, 11.6, False, 0, [bob[0][0]], bob[0][1], 10_000)
    assert index.copies(bob[0][0], 3) == 2
    # One request in flight with it uses one copy: the other is offered, as spare, to
    # the next conversation.
    carol = prefix_keys(chat(BRIEF, "hi there"))
    index.remember([bob[0][0]], 3, 7, 1, 12.0, True)
    (spare,) = index.holders(carol, now=12.5)
    assert (spare.row, spare.spare) == (3, True)
    # Both in use: busy.
    index.remember([bob[0][0]], 3, 7, 1, 12.0, True)
    busy: list[Holder] = []
    assert index.holders(carol, now=12.5, busy=busy) == []
    assert [holder.row for holder in busy] == [3]
    index.vacate([bob[0][0]], 3, 7)
    # Copies beyond the first count only while they are trusted to be found.
    index.copy_trust = TRUSTED / 2
    assert index.holders(carol, now=12.5) == []
    # But for one request every PROBE_EVERY seconds: the trust can only rise again by
    # requests sent to such copies.
    assert index.holders(carol, now=100.0)[0].spare
    assert index.holders(carol, now=100.0 + PROBE_EVERY / 2) == []
    assert index.holders(carol, now=100.0 + PROBE_EVERY)[0].spare
    index.copy_trust = 1.0
    assert index.holders(carol, now=12.5)[0].spare
    # Copies saved from idle slots count apart, while the host cache is trusted: with
    # both branch copies in use, the saved one is spare, until that trust falls.
    assert index.host_trust == HOST_START >= HOST_TRUSTED
    index.saved([bob[0][0]], 3, 7, 1, 4321)
    # (Kept as another prompt branches off the prefix: a copy more of either kind.)
    index.remember([], 3, 7, 1, 12.0, False, 0, [bob[0][0]], bob[0][1], 100)
    assert (index.copies(bob[0][0], 3), index.saved_copies(bob[0][0], 3)) == (3, 1)
    for _ in range(2):
        index.remember([bob[0][0]], 3, 7, 1, 12.0, True)
    asked: list[tuple[int, int, int]] = []

    def keeps(row: int, generation: int, saved_at: int) -> bool:
        asked.append((row, generation, saved_at))
        return True

    assert index.holders(carol, now=12.5) == []  # none counted without asking the caller
    (saved,) = index.holders(carol, 4, 12.5, None, keeps)
    assert (saved.spare, saved.saved, saved.saved_at) == (True, True, 4321)
    assert asked == [(3, 7, 4321)]
    # Which the caller rules out where the host cache may have dropped it (affinity.py).
    assert index.holders(carol, 4, 12.5, None, lambda *_: False) == []
    index.host_trust = HOST_TRUSTED - 0.01
    assert index.holders(carol, 4, 12.5, None, keeps) == []
    index.vacate([bob[0][0]], 3, 7)
    (branch,) = index.holders(carol, now=12.5)
    assert (branch.spare, branch.saved) == (True, False)
    # Nor is a saved prompt over four times the prefix a copy of it (as above).
    index.host_trust = 1.0
    index.saved([tiny[0][0]], 5, 7, 1)
    index.remember([tiny[0][0]], 5, 7, 1, 12.0, True)
    assert index.saved_copies(tiny[0][0], 5) == 1
    assert index.holders(prefix_keys(chat("be brief", "hey")), 4, 12.5, None, keeps) == []


def test_a_plain_prompt_continued_past_its_last_whole_block_is_no_branch(
    tmp_path: Path,
) -> None:
    affinity, table, index = affinity_for(tmp_path, max_wait=2.0)
    row = table.rows()[0]
    first: dict[str, object] = {"prompt": "x" * 1300}  # keyed at 512, 1024 and 1300

    def send(payload: dict[str, object]) -> list[tuple[int, int]]:
        plan = affinity.plan(None, payload)
        affinity.holds(plan, row, False, 0)
        return plan.keys

    keys = send(first)
    # Its next turn shares 512 and 1024 with it (not 1300): a continuation.
    longer = send({"prompt": "x" * 1300 + "y" * 700})
    assert longer[:2] == keys[:2]
    assert [index.copies(key, row.index) for key, _ in longer] == [1, 1, 1, 1]
    # Another prompt after the same first 512 characters, of 2,000 there, branches off.
    send({"prompt": "x" * 512 + "z" * 300})
    assert [index.copies(key, row.index) for key, _ in longer] == [2, 1, 1, 1]


def affinity_for(tmp_path: Path, max_wait: float) -> tuple[Affinity, SlotTable, PrefixIndex]:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    table.apply_report(REPORT, now=100.0)
    table.join()
    index = PrefixIndex.create(tmp_path / "prefixes", sets=64)
    settings = BalancerSettings(routing_policy="cache_aware", cache_max_wait=max_wait)
    recorder = Recorder(CounterFile.create(tmp_path / "1.counters"))
    return Affinity(settings, table, index, recorder), table, index


def test_the_prefill_rate_learned_is_shared_by_every_process(tmp_path: Path) -> None:
    one, table, _ = affinity_for(tmp_path, max_wait=2.0)
    other = Affinity(
        BalancerSettings(routing_policy="cache_aware"),
        table,
        PrefixIndex.open(tmp_path / "prefixes"),
        Recorder(CounterFile.create(tmp_path / "2.counters")),
    )
    one.learn(Plan([(1, 400)]), False, table.rows()[0], timings(0, 100, 50.0))
    assert other.seconds_per_char == pytest.approx(0.05 / 400)
    other.learn(Plan([(1, 400)]), False, table.rows()[0], timings(0, 100, 150.0))
    # A moving average: the second measurement weighs LEARNING_RATE.
    assert one.seconds_per_char == pytest.approx((0.05 + LEARNING_RATE * 0.1) / 400)


def timings(cache_n: int, prompt_n: int, prompt_ms: float, predicted_n: int = 0) -> PromptTimings:
    return parsed(
        f'"cache_n":{cache_n},"prompt_n":{prompt_n},"prompt_ms":{prompt_ms},'
        f'"prompt_per_token_ms":1.0,"predicted_n":{predicted_n}}}}}'.encode()
    )


def parsed(text: bytes) -> PromptTimings:
    found = prompt_timings(text)
    assert found is not None
    return found


def test_a_request_waits_for_its_busy_holder_no_longer_than_its_prefill(tmp_path: Path) -> None:
    affinity, table, index = affinity_for(tmp_path, max_wait=2.0)
    row = table.rows()[0]
    system = "be brief " * 200  # 1,800 characters
    first = chat(system, "hello")
    plan = affinity.plan(None, first)
    assert plan.waits == ()
    assert affinity.wait_budget(plan) == 0.0
    # llama.cpp said: 300 tokens processed in 600 ms, 100 more from cache.
    affinity.learn(plan, False, row, timings(100, 300, 600.0))
    assert affinity.seconds_per_char == pytest.approx(0.6 / 300 * 400 / plan.chars)
    # Too few tokens to time, no timings of the kind, or nonsense: nothing learned.
    affinity.learn(plan, False, row, timings(0, 3, 900.0))
    affinity.learn(plan, False, row, parsed(b'"cache_n":0}'))
    affinity.learn(plan, False, row, parsed(b'"cache_n":0,"prompt_n":400,"prompt_ms":nan}'))
    affinity.learn(plan, False, row, parsed(b'"cache_n":0,"prompt_n":400,"prompt_ms":1e300}'))
    affinity.learn(plan, False, row, parsed(b'"cache_n":0,"prompt_n":400,"prompt_ms":1e}'))
    assert affinity.seconds_per_char == pytest.approx(0.6 / 300 * 400 / plan.chars)

    keys = [key for key, _ in plan.keys]
    index.remember(keys, row.index, row.generation, row.cache_epoch, time.monotonic(), occupy=True)
    second = affinity.plan(None, chat(system, "goodbye"))
    assert [holder.row for holder in second.waits] == [row.index]
    assert second.prefer == ()
    assert second.saves == second.keys[0][1]  # the system message, all of it uncached
    assert second.saves > len(system)
    budget = affinity.wait_budget(second)
    assert budget == pytest.approx(affinity.seconds_per_char * second.saves)
    assert 0 < budget < 2.0

    # The holder stays busy: the request gives up after its budget, with no holder.
    started = time.monotonic()
    after = asyncio.run(affinity.wait_for_holder(second))
    assert budget <= time.monotonic() - started < budget + 0.5
    assert after.waits == () or after.prefer == ()
    assert after.prefer == ()

    # The holder's request ends while the next one waits: it is taken at once.
    async def end_soon() -> Plan:
        waiting = asyncio.ensure_future(affinity.wait_for_holder(second))
        await asyncio.sleep(0.02)
        index.vacate(keys, row.index, row.generation)
        return await waiting

    started = time.monotonic()
    freed = asyncio.run(end_soon())
    assert time.monotonic() - started < budget
    assert freed.waits == ()
    assert freed.prefer == (row.index,)
    assert affinity.expects(freed, row)


def in_flight(
    tmp_path: Path, max_wait: float, header: bytes | None, payload: dict[str, object]
) -> tuple[Affinity, SlotTable, PrefixIndex, list[int]]:
    """An affinity that has measured prefill, and a request of ``payload`` in flight on
    the table's one row, occupying its prefixes there (their keys)."""
    affinity, table, index = affinity_for(tmp_path, max_wait)
    row = table.rows()[0]
    plan = affinity.plan(header, payload)
    affinity.learn(plan, False, row, timings(0, 400, 800.0))
    keys = [key for key, _ in plan.keys]
    index.remember(keys, row.index, row.generation, row.cache_epoch, time.monotonic(), occupy=True)
    return affinity, table, index, keys


def test_nothing_waits_with_a_zero_max_wait_or_for_a_session(tmp_path: Path) -> None:
    system = "be brief " * 200
    affinity, *_ = in_flight(tmp_path, 0.0, None, chat(system, "hello"))
    assert affinity.plan(None, chat(system, "goodbye")).waits == ()
    affinity, *_ = in_flight(tmp_path / "session", 2.0, b"alice", chat("hi"))
    # Alice's next request, while her first runs: it does not wait for the first.
    assert affinity.plan(b"alice", chat("hi")).waits == ()


def test_a_client_that_leaves_while_waiting_for_a_holder_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    system = "be brief " * 200
    affinity, table, index, keys = in_flight(tmp_path, 2.0, None, chat(system, "hello"))
    row = table.rows()[0]
    waiting = affinity.plan(None, chat(system, "goodbye"))
    assert waiting.waits

    async def leave_while_waiting() -> None:
        task = asyncio.ensure_future(affinity.wait_for_holder(waiting))
        await asyncio.sleep(0.03)
        task.cancel()  # what the proxy does when the client's connection drops
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_while_waiting())
    # Nothing taken or queued for it; the holder's count is its own request's alone.
    assert table.rows()[0].reservations == 0
    assert table.waiting() == 0
    assert index.in_flight(keys[0], row.index) == 1


def test_a_stream_sent_to_its_prefix_holds_that_copy_from_the_start(tmp_path: Path) -> None:
    affinity, table, index = affinity_for(tmp_path, max_wait=2.0)
    row = table.rows()[0]
    system = "be brief " * 200
    first = affinity.plan(None, chat(system, "hello"))
    affinity.learn(first, False, row, timings(0, 400, 800.0))
    index.remember([first.keys[0][0]], row.index, row.generation, row.cache_epoch, 1.0)
    # A stream of the same system prompt takes its slot on the holder: the copy is in
    # use from now, while its own question is read, not only from its first token.
    plan = affinity.plan(None, chat(system, "goodbye"))
    assert affinity.expects(plan, row)
    occupied: list[int] = []
    early = affinity.occupy_held(plan, row, occupied)
    assert early == plan.keys[0][1]
    assert occupied == [plan.keys[0][0]]
    assert affinity.plan(None, chat(system, "and you?")).waits  # a third waits for it
    # Its first token: only the prefixes it did not hold yet are added.
    occupied.extend(affinity.holds(plan, row, True, early))
    assert occupied == [key for key, _ in plan.keys]
    assert [index.in_flight(key, row.index) for key in occupied] == [1, 1]
    affinity.vacate(occupied, row)
    assert [index.in_flight(key, row.index) for key in occupied] == [0, 0]
    assert affinity.plan(None, chat(system, "and you?")).waits == ()
    # A row that does not hold it: nothing occupied before the first token.
    other: list[int] = []
    assert affinity.occupy_held(first, row, other) == 0
    assert other == []


def test_an_idle_slot_saved_to_the_host_cache_is_a_spare_copy_of_its_prompt(
    tmp_path: Path,
) -> None:
    """Bench W2, llama.cpp's default host cache: a group's request waited up to 0.9 s for
    the slot holding the group's system prompt, while the other slot of that server was
    idle and the prompt was in its host cache, saved there when that slot's last task
    started (llama.cpp saves every idle slot's prompt then): sent to the idle slot at
    once, it loads it."""
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    table.apply_report(replace(REPORT, build="b0-unknown"), now=100.0)
    table.join()
    row = table.rows()[0]
    index = PrefixIndex.create(tmp_path / "prefixes", sets=64)
    affinity = Affinity(
        BalancerSettings(routing_policy="cache_aware", cache_max_wait=2.0),
        table,
        index,
        Recorder(CounterFile.create(tmp_path / "1.counters")),
        SlotContents.create(tmp_path / "contents", rows=4),
    )
    system = "be brief " * 200

    def request(*contents: str) -> tuple[Plan, int]:
        plan = affinity.plan(None, chat(*contents))
        slot = affinity.pin(plan, row)[0]
        affinity.holds(plan, row, False, 0)
        return plan, slot

    first, slot = request(system, "hello")
    affinity.learn(first, False, row, timings(0, 400, 800.0))  # (prefill measured)
    affinity.measured(row, slot, timings(0, 390, 800.0, 10))  # the slot holds 400 tokens
    affinity.unpin(row, slot)
    # While a request goes on from that slot, one copy of the system prompt: the next
    # waits for it.
    occupied: list[int] = []
    affinity.occupy_held(affinity.plan(None, chat(system, "one")), row, occupied)
    assert affinity.plan(None, chat(system, "two")).waits
    affinity.vacate(occupied, row)
    # A request with another prompt takes the other slot: llama.cpp saves the first
    # slot's prompt as it starts, a second copy of the system prompt.
    _, other = request("Something else entirely. " * 40, "hello")
    assert other != slot
    system_key = first.keys[0][0]
    assert (index.copies(system_key, row.index), index.saved_copies(system_key, row.index)) == (
        1,
        1,
    )
    affinity.unpin(row, other)

    def waits() -> bool:
        occupied: list[int] = []
        affinity.occupy_held(affinity.plan(None, chat(system, "one")), row, occupied)
        waiting = bool(affinity.plan(None, chat(system, "two")).waits)
        affinity.vacate(occupied, row)
        return waiting

    # Saved copies count only where the upstream's agent said how much of idle slots'
    # prompts its host cache keeps: this one's did not.
    assert index.host_trust == HOST_START >= HOST_TRUSTED
    assert waits()
    sequence = REPORT.sequence

    def host_cache(tokens: int, processing: int = 0) -> None:
        nonlocal sequence
        sequence += 1
        report = replace(
            REPORT,
            build="b0-unknown",
            sequence=sequence,
            host_cache_tokens=tokens,
            slots_idle=REPORT.slots_total - processing,
            slots_processing=processing,
        )
        table.apply_report(report, now=100.0 + sequence)
        assert table.host_cache_tokens(row.index) == tokens

    # And only while what the upstream saved there since, and the copy itself, take at
    # most half of it: the system prompt's slot, 400 tokens as the first request's
    # timings counted them, its answer's included.
    assert index.tokens_per_char == 400 / first.chars
    host_cache(798)
    assert waits()
    host_cache(802)
    assert not waits()
    host_cache(UNLIMITED_HOST_CACHE)
    assert not waits()
    occupied = []
    affinity.occupy_held(affinity.plan(None, chat(system, "one")), row, occupied)
    spare = affinity.plan(None, chat(system, "two"))
    assert spare.waits == ()
    assert spare.prefer == (row.index,)
    assert (spare.expected[0].spare, spare.expected[0].saved) == (True, True)
    # Only what the upstream holds gains a copy.
    index.saved([12345], row.index, row.generation, row.cache_epoch)
    index.saved([system_key], row.index, row.generation, row.cache_epoch + 1)
    assert (index.saved_copies(12345, row.index), index.saved_copies(system_key, row.index)) == (
        0,
        1,
    )
    # Sent to it but given the holder's own slot (freed meanwhile): nothing measured.
    affinity.learn(spare, True, row, timings(0, 400, 800.0), False)
    assert index.host_trust == HOST_START
    affinity.vacate(occupied, row)
    # One found in a slot it goes on from in place says nothing of the host cache.
    relied = affinity.plan(None, chat(system, "three"))
    assert not relied.expected[0].spare
    affinity.learn(relied, True, row, timings(380, 20, 40.0), False)
    assert index.host_trust == HOST_START
    # Any request that relied on the host cache (pin() says so: the group whose slot a
    # spare took, say) and did not find its prefix there turns saved copies off,
    # whatever the host cache's size says, and leaves the trust of branch copies be:
    # the next request waits for the holder.
    affinity.learn(relied, True, row, timings(0, 400, 800.0), True)
    assert (index.host_trust, index.copy_trust) == (0.75, 1.0)
    assert waits()
    # Until a request that relied on it finds it again.
    affinity.learn(relied, True, row, timings(380, 20, 40.0), True)
    assert index.host_trust == 0.8125
    assert not waits()
    # Requests this balancer did not send run there (the agent reports a busy slot that
    # none of its requests holds): what llama.cpp saves meanwhile is unseen, and no saved
    # copy recorded before counts.
    host_cache(UNLIMITED_HOST_CACHE, processing=1)
    foreign = table.rows()[0]
    assert foreign.foreign_busy == table.foreign_busy(row.index) == 1
    assert waits()  # while the agent reports them
    assert affinity.pin(affinity.plan(None, chat("Another client's question")), foreign) == (
        -1,
        False,
    )
    host_cache(UNLIMITED_HOST_CACHE)
    assert waits()


def test_a_request_relies_on_the_host_cache_where_no_slot_keeps_its_prefix(
    tmp_path: Path,
) -> None:
    """What pin() tells learn(): a conversation whose slot two other prompts took relies
    on llama.cpp's host cache for its next turn (the slot it gets shares nothing with
    it); a new conversation that overwrites a long one after the same system prompt
    keeps that prompt in its slot, whatever the host cache holds."""
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    table.apply_report(replace(REPORT, build="b0-unknown"), now=100.0)
    table.join()
    row = table.rows()[0]
    affinity = Affinity(
        BalancerSettings(routing_policy="cache_aware"),
        table,
        PrefixIndex.create(tmp_path / "prefixes", sets=64),
        Recorder(CounterFile.create(tmp_path / "1.counters")),
        SlotContents.create(tmp_path / "contents", rows=4),
    )
    system = "be brief " * 40
    story = "tell me a long story " * 40

    def request(*contents: str) -> bool:
        plan = affinity.plan(None, chat(*contents))
        hosted: list[bool] = []
        slot = affinity.pin(plan, row, hosted)[0]
        affinity.holds(plan, row, False, 0)
        affinity.unpin(row, slot)
        (relies,) = hosted
        return relies

    assert not request(system, story)  # nothing expected anywhere
    assert not request("Something else entirely. " * 40, "hello")
    assert not request("Yet another thing. " * 40, "hi")  # takes the story's slot
    assert request(system, story, "Once...", "Go on.")
    assert not request(system, "a short question")


def test_spare_copies_count_while_requests_sent_to_them_find_them_cached(tmp_path: Path) -> None:
    affinity, table, index = affinity_for(tmp_path, max_wait=2.0)
    row = table.rows()[0]
    epoch = row.cache_epoch
    system = "be brief " * 200
    # Two conversations went on from one system prompt on the row, the first far longer
    # than it: two copies (the first's saved to llama.cpp's host cache).
    for question in ("hello " * 400, "good day"):
        plan = affinity.plan(None, chat(system, question))
        affinity.learn(plan, False, row, timings(0, 400, 800.0))  # (prefill measured)
        affinity.holds(plan, row, False, 0)
    assert index.copies(plan.keys[0][0], row.index) == 2
    # Two guesses on the row that missed: one more would mean its cache is gone.
    for _ in range(2):
        affinity.learn(plan, True, row, timings(0, 400, 800.0))
    # A stream with it in flight uses one; the next request is sent to the other at
    # once instead of waiting for the first.
    running = affinity.plan(None, chat(system, "one"))
    occupied: list[int] = []
    affinity.occupy_held(running, row, occupied)
    third = affinity.plan(None, chat(system, "two"))
    assert third.waits == ()
    assert third.prefer == (row.index,)
    assert third.expected[0].spare
    # Taking it makes no copy more: llama.cpp moves the copy from its host cache into
    # the slot the request takes.
    affinity.holds(third, row, False, 0)
    assert index.copies(plan.keys[0][0], row.index) == 2
    # llama.cpp served the system prompt from its cache: trusted as before (and the
    # row's cache is there: the misses before count no more).
    affinity.learn(third, True, row, timings(380, 20, 40.0))
    assert index.copy_trust == 1.0
    # It did not, three times: the host cache is too small for such copies to last.
    for _ in range(3):
        affinity.learn(third, True, row, timings(0, 400, 800.0))
    assert index.copy_trust < TRUSTED
    # One more request is sent to the spare copy, a probe; the next waits for its holder.
    assert affinity.plan(None, chat(system, "four")).waits == ()
    assert affinity.plan(None, chat(system, "four")).waits
    # Which is not the upstream losing its cache: everything else it holds still counts
    # (two misses of its own more, since the hit, are not the three that say so).
    for _ in range(2):
        affinity.learn(plan, True, row, timings(0, 400, 800.0))
    assert table.rows()[0].cache_epoch == epoch
    affinity.vacate(occupied, row)
    assert affinity.expects(affinity.plan(None, chat(system, "two")), row)
