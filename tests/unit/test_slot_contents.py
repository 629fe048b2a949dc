"""The slot record: which llama.cpp slot of an upstream a cache_aware request names."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from paddler.balancer.proxy.affinity import PINNING_BUILD, Affinity, Plan
from paddler.balancer.proxy.handler import may_name_slot, naming
from paddler.config import BalancerSettings
from paddler.metrics.counters import CounterFile
from paddler.metrics.recorder import Recorder
from paddler.prefixes.index import PrefixIndex, PrefixIndexError
from paddler.prefixes.keys import prefix_keys, session_key
from paddler.prefixes.slots import (
    BUSY_HORIZON,
    PLACING,
    SLOTS,
    SlotContents,
    SlotContentsError,
)
from paddler.slots import SlotTable, UpstreamRow
from tests.unit.test_prefixes import chat
from tests.unit.test_slot_table import REPORT

SYSTEM = "You answer questions about the fleet. " * 20


def keys_of(*contents: str) -> tuple[list[tuple[int, int]], int]:
    keys = prefix_keys(chat(*contents))
    return keys, keys[-1][1]


def run(contents: SlotContents, slot_count: int, now: float, *turn: str) -> tuple[int, bool]:
    """A request with this conversation on row 0 (generation 1, epoch 0), ended at once:
    the slot it took, and whether it named it."""
    keys, chars = keys_of(*turn)
    slot, named = contents.take(0, 1, 0, slot_count, keys, chars, now)
    contents.release(0, 1, slot, now + 1.0)
    return slot, named


def test_a_new_conversation_takes_the_slot_used_longest_ago_of_those_sharing_its_prefix(
    tmp_path: Path,
) -> None:
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    # Two conversations after one system prompt, at the same time: a slot each. A slot
    # never used is llama.cpp's to choose (the last, as it does) while no other is
    # taken; the second is named, else llama.cpp could see it first and give it the
    # slot the record gives the first (tests/integration/test_proxy.py, twelve streams).
    ended, chars = keys_of(SYSTEM, "ended: one question only")
    assert contents.take(0, 1, 0, 2, ended, chars, 10.0) == (1, False)
    live, chars = keys_of(SYSTEM, "live: tell me about slots")
    assert contents.take(0, 1, 0, 2, live, chars, 10.05) == (0, True)
    contents.release(0, 1, 1, 12.0)  # the one that ends
    contents.release(0, 1, 0, 12.5)
    # The live one's next turn finds its own slot, though the other was used longer ago.
    assert run(contents, 2, 20.0, SYSTEM, "live: tell me about slots", "sure", "more?") == (
        0,
        True,
    )
    # A new conversation shares the system prompt with both: llama.cpp would take the
    # first by number, the live one's; the record names the one used longest ago.
    other = SlotContents.open(tmp_path / "contents")  # another worker
    assert run(other, 2, 30.0, SYSTEM, "new: hello") == (1, True)
    # And the live conversation still has its slot.
    turn = (SYSTEM, "live: tell me about slots", "sure", "more?", "ok")
    assert run(contents, 2, 40.0, *turn) == (0, True)


def test_a_new_conversation_overwrites_a_slot_sharing_its_prefix_before_filling_one_never_used(
    tmp_path: Path,
) -> None:
    """Bench W1 with llama.cpp's 8 GiB host cache: a conversation ran in one slot, the
    other was never used. Given the empty slot, a new conversation after the same system
    prompt processed all of it again (a named empty slot loads nothing from llama.cpp's
    host cache, #28139); given the other, it keeps the system prompt, and llama.cpp
    saves the conversation it overwrites to its host cache first."""
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    long_question = "Tell me everything about the rivers of Europe. " * 40
    assert run(contents, 2, 1.0, SYSTEM, long_question) == (1, False)
    turn = (SYSTEM, long_question, "an answer", "and then?")
    assert run(contents, 2, 3.0, *turn) == (1, True)
    assert run(contents, 2, 5.0, SYSTEM, "new: hello") == (1, True)
    assert contents.held(0, 0) == []  # still never used
    # Of several slots sharing as much, the one used longest ago.
    other = SlotContents.create(tmp_path / "other", rows=4)
    assert other.take(0, 1, 0, 3, *keys_of(SYSTEM, long_question), 1.0) == (2, False)
    assert other.take(0, 1, 0, 3, *keys_of(SYSTEM, "Rivers? " * 300), 1.05) == (1, True)
    other.release(0, 1, 1, 2.0)
    other.release(0, 1, 2, 3.0)
    assert run(other, 3, 4.0, SYSTEM, "Lakes, then. " * 200) == (1, True)
    # A prompt that shares nothing with any slot's leaves the empty slot to llama.cpp,
    # which takes the same and loads from its host cache what it can.
    assert run(other, 3, 5.0, "something else") == (0, False)


def test_a_slot_whose_prompt_the_request_goes_on_from_beats_one_it_would_overwrite(
    tmp_path: Path,
) -> None:
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    long_question = "Tell me everything about the rivers of Europe. " * 40
    assert contents.take(0, 1, 0, 2, *keys_of(SYSTEM, long_question), 1.0) == (1, False)
    assert contents.take(0, 1, 0, 2, *keys_of(SYSTEM, "short"), 1.05) == (0, True)
    contents.release(0, 1, 1, 2.5)
    contents.release(0, 1, 0, 3.0)
    # Both share the system prompt; the long question's slot was used longer ago, but
    # the request would overwrite most of it, and keeps most of the other's.
    assert run(contents, 2, 4.0, SYSTEM, "another short one") == (0, True)


def test_a_conversation_of_several_turns_is_not_gone_on_from_by_one_sharing_its_system_prompt(
    tmp_path: Path,
) -> None:
    """Bench W1 (32 MiB, 2026-12-05): a new conversation shared only the system prompt
    with a conversation in its third turn, which was over half of that one's characters
    (short answers), and took its slot in place: the one going on lost its turns. The
    slot of a conversation that ended, used longer ago, was there to take."""
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    ended = (SYSTEM, "Tell me everything about the rivers of Europe. " * 40)
    assert contents.take(0, 1, 0, 2, *keys_of(*ended), 1.0) == (1, False)
    going_on = [SYSTEM, "a", "b", "c", "d", "e"]
    assert contents.take(0, 1, 0, 2, *keys_of(*going_on[:2]), 1.05) == (0, True)
    contents.release(0, 1, 1, 1.8)
    contents.release(0, 1, 0, 2.0)
    assert run(contents, 2, 3.0, *going_on) == (0, True)  # its third turn, in place
    assert 2 * len(SYSTEM) > keys_of(*going_on)[1]  # the system prompt is most of it
    assert run(contents, 2, 4.0, SYSTEM, "new: hello") == (1, True)
    assert run(contents, 2, 5.0, *going_on, "f", "g") == (0, True)
    # A question after the system prompt, answered, is gone on from in place by the next
    # question (bench W2), though the other slot was used longer ago.
    assert run(contents, 2, 6.0, SYSTEM, "q1") == (1, True)
    assert run(contents, 2, 7.0, SYSTEM, "q2") == (1, True)
    # With no other slot sharing the system prompt (the other never used), the
    # conversation's slot is gone on from in place, as llama.cpp would: the slot never
    # used would process the system prompt again.
    fresh = SlotContents.create(tmp_path / "fresh", rows=4)
    assert run(fresh, 2, 1.0, *going_on[:2]) == (1, False)
    assert run(fresh, 2, 2.0, *going_on) == (1, True)
    assert run(fresh, 2, 3.0, SYSTEM, "new: hello") == (1, True)


def test_without_a_shared_prefix_the_slot_used_longest_ago_is_taken(tmp_path: Path) -> None:
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    assert run(contents, 3, 1.0, "first") == (2, False)  # none used yet: the last
    assert run(contents, 3, 2.0, "second") == (1, False)
    assert run(contents, 3, 3.0, "third") == (0, False)
    assert run(contents, 3, 4.0, "fourth") == (2, True)
    # A prefix no more than a tenth of the prompt is no match (llama.cpp's similarity):
    # slot 1, used longest ago, not slot 2 that holds "fourth".
    assert run(contents, 3, 6.0, "fourth", "x" * 200) == (1, True)


def test_a_busy_slot_is_not_taken_until_its_request_ends(tmp_path: Path) -> None:
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    keys, chars = keys_of(SYSTEM, "question")
    assert contents.take(0, 1, 0, 2, keys, chars, 1.0) == (1, False)
    assert contents.take(0, 1, 0, 2, keys, chars, 1.05) == (0, True)  # the other just taken
    assert contents.take(0, 1, 0, 2, keys, chars, 3.0) == (-1, False)  # none idle
    contents.release(0, 1, 0, 4.0)
    assert contents.take(0, 1, 0, 2, keys, chars, 5.0) == (0, True)
    # A request whose worker died never releases: its slot is idle again after the horizon.
    assert contents.take(0, 1, 0, 2, keys, chars, 1.0 + BUSY_HORIZON + 1)[0] == 1


def test_a_slot_never_used_is_named_only_while_a_request_not_begun_is_in_flight(
    tmp_path: Path,
) -> None:
    """Left unnamed, llama.cpp gives a request the empty slot and loads into it what the
    request shares with a prompt in its host cache; named, the empty slot loads nothing
    (#28139). But llama.cpp may not have given a request that took another slot its slot
    yet: an unnamed one that it saw first could take that slot, and the other would
    wait inside llama.cpp. Once llama.cpp begins answering a request, it has its slot."""
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    keys, chars = keys_of(SYSTEM, "first")
    assert contents.take(0, 1, 0, 3, keys, chars, 1.0) == (2, False)
    other, other_chars = keys_of("unrelated")
    assert contents.take(0, 1, 0, 3, other, other_chars, 1.05) == (1, True)  # 2 not begun
    contents.begun(0, 1, 2)
    assert contents.take(0, 1, 0, 3, *keys_of("third"), 1.08) == (0, True)  # 1 not begun
    # The same with the first request begun: the empty slot is left to llama.cpp.
    fresh = SlotContents.create(tmp_path / "fresh", rows=4)
    assert fresh.take(0, 1, 0, 2, keys, chars, 1.0) == (1, False)
    fresh.begun(0, 1, 1)
    assert fresh.take(0, 1, 0, 2, other, other_chars, 1.01) == (0, False)
    # begun() of an idle slot, or of a row another upstream took since, changes nothing.
    fresh.release(0, 1, 0, 3.0)
    fresh.begun(0, 1, 0)
    assert fresh.take(0, 1, 0, 2, other, other_chars, 4.0) == (0, True)  # in place
    fresh.release(0, 1, 0, 5.0)
    assert fresh.take(0, 2, 0, 2, keys, chars, 6.0) == (1, False)  # a new upstream
    fresh.begun(0, 1, 1)  # the old one's request
    assert fresh.take(0, 2, 0, 2, other, other_chars, 6.05) == (0, True)  # 1 not begun
    # A request begun is still busy: its slot is not taken.
    fresh.begun(0, 2, 1)
    assert fresh.take(0, 2, 0, 2, other, other_chars, 6.06) == (-1, False)
    # Sent PLACING ago or longer, a request not begun is in llama.cpp's queue: a request
    # sent later is queued after it, and llama.cpp gives it the empty slot unnamed.
    late = SlotContents.create(tmp_path / "late", rows=4)
    assert late.take(0, 1, 0, 2, keys, chars, 1.0) == (1, False)
    assert late.take(0, 1, 0, 2, other, other_chars, 1.0 + PLACING) == (0, False)


def test_another_upstream_in_the_row_or_a_lost_cache_forgets_the_slots(tmp_path: Path) -> None:
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    assert run(contents, 2, 1.0, SYSTEM, "a") == (1, False)
    assert run(contents, 2, 2.0, "unrelated") == (0, False)
    keys, chars = keys_of(SYSTEM, "a", "answer", "next")
    assert contents.take(0, 1, 0, 2, keys, chars, 3.0) == (1, True)  # its conversation's slot
    contents.release(0, 1, 1, 3.5)
    # The upstream lost its cache (a new epoch): nothing is known of its slots.
    assert contents.take(0, 1, 1, 2, keys, chars, 4.0) == (1, False)
    assert contents.held(0, 0) == []
    # A busy slot of the upstream that had the row before does not count for the next.
    assert contents.take(0, 2, 0, 2, keys, chars, 5.0) == (1, False)
    contents.release(0, 1, 1, 5.02)  # the old upstream's request ending changes nothing
    assert contents.take(0, 2, 0, 2, keys, chars, 5.05) == (0, True)  # slot 1 just taken


def taking(
    contents: SlotContents, keys: list[tuple[int, int]], chars: int, now: float
) -> tuple[tuple[int, bool], list[int]]:
    """take() on row 0 of 3 slots: its answer, and the keys of the prompts it saved."""
    saved: list[int] = []
    return contents.take(0, 1, 0, 3, keys, chars, now, saved), saved


def test_the_idle_slots_a_request_starts_beside_are_reported_saved_once_per_prompt(
    tmp_path: Path,
) -> None:
    """llama.cpp saves every idle slot's prompt to its host cache as a task starts
    (--cache-idle-slots): each prompt once, until a request takes its slot again."""
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    group, chars = keys_of(SYSTEM, "a group's question")
    assert taking(contents, group, chars, 1.0) == ((2, False), [])  # none other used
    contents.release(0, 1, 2, 2.0)
    other, other_chars = keys_of("Something else entirely. " * 40, "hello")
    assert taking(contents, other, other_chars, 3.0) == ((1, False), [k for k, _ in group])
    # Saved already, and the slot busy with the request just sent: nothing more.
    assert taking(contents, other, other_chars, 3.05) == ((0, True), [])
    contents.release(0, 1, 1, 4.0)
    contents.release(0, 1, 0, 4.0)
    # The group's slot taken again, in place, by its next question: a new prompt there,
    # saved at the next task that starts beside it. The two others hold a copy each.
    again, again_chars = keys_of(SYSTEM, "a group's question", "answer", "more")
    assert taking(contents, again, again_chars, 5.0) == ((2, True), [k for k, _ in other] * 2)
    contents.release(0, 1, 2, 6.0)
    assert taking(contents, other, other_chars, 7.0) == ((0, True), [k for k, _ in again])


def refilling(
    contents: SlotContents, slots: int, now: float, *turn: str
) -> tuple[tuple[int, bool], int]:
    """take() on row 0: its answer, and what llama.cpp refills the slot from its host
    cache after (the characters the slot shares with the prompt; -1: no refill); the
    request ends at once."""
    keys, chars = keys_of(*turn)
    refilled: list[int] = []
    taken = contents.take(0, 1, 0, slots, keys, chars, now, None, refilled)
    contents.release(0, 1, taken[0], now + 0.5)
    (refills,) = refilled
    return taken, refills


def test_the_record_says_which_slots_llama_cpp_refills_from_its_host_cache(
    tmp_path: Path,
) -> None:
    """llama.cpp looks in its host cache for a slot whose prompt the request mostly
    overwrites, and for an empty slot it picks itself; not for one the request goes on
    from in place, nor for an empty slot named (llama.cpp #28139). A request whose
    prefix is expected on the upstream but is in no slot relies on the host cache."""
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    long_chat = ("hello", "a long answer " * 60, "and then?", "another long answer " * 60)
    # The first request: an empty slot, llama.cpp's to pick.
    assert refilling(contents, 2, 1.0, SYSTEM, *long_chat) == ((1, False), 0)
    # Its next turn goes on from its prompt in place.
    assert refilling(contents, 2, 2.0, SYSTEM, *long_chat, "more") == ((1, True), -1)
    # While that slot is busy, a new conversation is named the empty one: no refill.
    keys, chars = keys_of(SYSTEM, *long_chat, "more", "ok", "again")
    assert contents.take(0, 1, 0, 2, keys, chars, 3.0) == (1, True)
    assert refilling(contents, 2, 3.01, SYSTEM, "a short question") == ((0, True), -1)
    contents.release(0, 1, 1, 3.5)
    # The long conversation's slot, overwritten by a new one that shares only the system
    # prompt with it (the short one's slot busy): refilled, its prompt saved first.
    keys, chars = keys_of(SYSTEM, "a short question", "yes", "why?")
    assert contents.take(0, 1, 0, 2, keys, chars, 4.0) == (0, True)
    system_length = keys_of(SYSTEM, "another question")[0][0][1]
    assert refilling(contents, 2, 4.01, SYSTEM, "another question") == (
        (1, True),
        system_length,
    )


def test_upstreams_with_more_slots_than_recorded_choose_their_own(tmp_path: Path) -> None:
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    keys, chars = keys_of(SYSTEM, "a")
    assert contents.take(0, 1, 0, SLOTS + 1, keys, chars, 1.0) == (-1, False)
    assert contents.take(0, 1, 0, 0, keys, chars, 1.0) == (-1, False)
    assert contents.take(4, 1, 0, 2, keys, chars, 1.0) == (-1, False)  # no such row
    assert contents.take(3, 1, 0, SLOTS, keys, chars, 1.0) == (SLOTS - 1, False)


def affinity_with_row(tmp_path: Path, build: str, busy: int = 0) -> tuple[Affinity, UpstreamRow]:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4)
    report = replace(REPORT, build=build, slots_total=2, slots_idle=2 - busy, slots_processing=busy)
    table.apply_report(report, now=100.0)
    contents = SlotContents.create(tmp_path / "contents", rows=4)
    settings = BalancerSettings(routing_policy="cache_aware")
    recorder = Recorder(CounterFile.create(tmp_path / "1.counters"))
    return Affinity(settings, table, None, recorder, contents), table.rows()[0]


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (f"b{PINNING_BUILD}-abcdef12", True),
        ("b11434-69ce80f4", True),
        ("b0-unknown", True),  # built from a source archive: no number, a current build
        (f"b{PINNING_BUILD - 1}-abcdef12", False),  # would skip its prompt cache
        ("b9670-02810c7a", False),
    ],
)
def test_slots_are_named_only_on_builds_that_keep_their_prompt_cache(
    tmp_path: Path, build: str, named: bool
) -> None:
    affinity, row = affinity_with_row(tmp_path, build)
    keys, _ = keys_of(SYSTEM, "a")
    assert affinity.pin(Plan(keys), row)[0] == (1 if named else -1)


def test_no_slot_is_named_where_other_clients_use_the_upstream(tmp_path: Path) -> None:
    affinity, row = affinity_with_row(tmp_path, "b11434-69ce80f4", busy=1)
    assert row.foreign_busy == 1
    keys, _ = keys_of(SYSTEM, "a")
    assert affinity.pin(Plan(keys), row) == (-1, False)


def test_a_request_begun_leaves_the_empty_slot_to_llama_cpp(tmp_path: Path) -> None:
    """The handler tells the record when a request's answer begins (its first byte):
    from then on llama.cpp has given it its slot, and the next request is left to
    llama.cpp's own choice, which fills an empty slot from its host cache."""
    first, _ = keys_of(SYSTEM, "a")
    second, _ = keys_of("unrelated")
    (tmp_path / "begun").mkdir()
    (tmp_path / "not begun").mkdir()
    affinity, row = affinity_with_row(tmp_path / "begun", "b11434-69ce80f4")
    assert affinity.pin(Plan(first), row) == (1, False)
    affinity.begun(row, 1)
    assert affinity.pin(Plan(second), row) == (0, False)
    # Not begun, and sent a moment ago: the empty slot is named.
    affinity, row = affinity_with_row(tmp_path / "not begun", "b11434-69ce80f4")
    assert affinity.pin(Plan(first), row) == (1, False)
    assert affinity.pin(Plan(second), row) == (0, True)


def test_a_session_key_is_not_recorded_as_a_prefix(tmp_path: Path) -> None:
    affinity, row = affinity_with_row(tmp_path, "b11434-69ce80f4")
    keys, _ = keys_of(SYSTEM, "a")
    plan = Plan([*keys, (session_key("user-1"), 1 << 30)])
    slot, _ = affinity.pin(plan, row)
    assert slot == 1
    assert affinity.contents is not None
    assert affinity.contents.held(row.index, slot) == [key for key, _ in keys]
    affinity.unpin(row, slot)
    # Released: idle again, and it holds the prompt (named now: it was used).
    assert affinity.pin(plan, row) == (1, True)


def test_the_named_slot_goes_first_in_the_forwarded_body() -> None:
    body = b' {"messages": [{"role": "user", "content": "{hi}"}], "stream": true}'
    named = json.loads(naming(body, 3))
    assert named == {"id_slot": 3, **json.loads(body)}
    assert next(iter(named)) == "id_slot"


def test_only_completions_whose_client_named_no_slot_name_one() -> None:
    chat_request = {"messages": [{"role": "user", "content": "hi"}]}
    assert may_name_slot("/v1/chat/completions", chat_request)
    assert may_name_slot("/completion", {"prompt": "hi"})
    assert not may_name_slot("/v1/chat/completions", {**chat_request, "id_slot": 1})
    assert not may_name_slot("/v1/embeddings", {"input": "hi"})  # llama.cpp ignores it there
    assert not may_name_slot("/v1/chat/completions", {})  # no member to go before
    assert not may_name_slot("/v1/chat/completions", [chat_request])


def test_a_missing_or_foreign_file_is_refused_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(SlotContentsError, match=r"cannot open the slot record .*missing"):
        SlotContents.open(tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PDLRPRFX" + bytes(100))  # a prefix index's magic
    with pytest.raises(SlotContentsError, match="foreign is not a slot record of version"):
        SlotContents.open(foreign)
    with pytest.raises(PrefixIndexError, match="foreign is not a prefix index of version"):
        PrefixIndex.open(foreign)
    # The prefix index starts trusting copies; both start with nothing held.
    index = PrefixIndex.create(tmp_path / "prefixes", sets=8)
    assert (index.copy_trust, index.prefill_rate) == (1.0, 0.0)
    assert SlotContents.create(tmp_path / "contents", rows=2).held(1, SLOTS - 1) == []


def test_the_record_counts_the_tokens_llama_cpp_saves_to_its_host_cache(
    tmp_path: Path,
) -> None:
    """What the balancer knows of how full llama.cpp's host cache is: every prompt saved
    there (an idle slot's as a task starts beside it, once; a slot's the request mostly
    overwrites, unless saved already), as many tokens as the slot held (estimated as the
    request takes it, measured from its answer's timings), and where that count stood
    before a request's saves (they are kept while what is saved after them leaves
    room)."""
    contents = SlotContents.create(tmp_path / "contents", rows=4)

    def take(row: int, slots: int, now: float, tokens: int, *turn: str) -> tuple[int, int]:
        keys, chars = keys_of(*turn)
        before: list[int] = []
        slot, _ = contents.take(row, 1, 0, slots, keys, chars, now, [], None, before, tokens)
        contents.release(row, 1, slot, now + 0.5)
        (stamp,) = before
        return slot, stamp

    assert take(0, 3, 1.0, 100, SYSTEM, "a group's question") == (2, 0)
    assert contents.saved_since(0, 1, 0) == 0
    # The group's idle slot is saved as the next task starts: its estimate.
    assert take(0, 3, 2.0, 200, "Something else entirely. " * 40, "hello") == (1, 0)
    assert contents.saved_since(0, 1, 0) == 100
    # The other's now, as its answer measured it (the slot still taken); the group's
    # not again.
    keys, chars = keys_of("A third thing. " * 30, "hi")
    before: list[int] = []
    slot, _ = contents.take(0, 1, 0, 3, keys, chars, 3.0, [], None, before, 300)
    assert (slot, before) == (0, [100])
    contents.measured(0, 1, slot, 330)
    contents.release(0, 1, slot, 3.5)
    contents.measured(0, 1, slot, 999)  # released: another request's slot by now
    assert contents.saved_since(0, 1, 0) == 300
    assert take(0, 3, 4.0, 50, SYSTEM, "a group's question", "yes", "more") == (2, 300)
    assert contents.saved_since(0, 1, 0) == 300 + 330  # (the other's was saved already)
    # One slot: no idle one beside it, but what the request overwrites is saved first.
    assert take(1, 1, 4.0, 100, SYSTEM, "a group's question") == (0, 0)
    assert take(1, 1, 5.0, 70, "A third thing. " * 30, "hi") == (0, 0)
    assert contents.saved_since(1, 1, 0) == 100
    # Not a prompt the request goes on from in place.
    assert take(1, 1, 6.0, 90, "A third thing. " * 30, "hi", "yes", "and?") == (0, 100)
    assert contents.saved_since(1, 1, 0) == 100
    assert contents.saved_since(1, 1, 60) == 40
    # Requests another client sent ran there: what they saved is unseen, and how much
    # was saved since any earlier save is not known; since a later one, it is.
    contents.unseen(1, 1)
    assert contents.saved_since(1, 1, 0) == contents.saved_since(1, 1, 100) == -1
    assert take(1, 1, 7.0, 80, SYSTEM, "another question") == (0, 101)
    assert contents.saved_since(1, 1, 101) == 90  # the conversation overwritten, saved
    # Another upstream in the row: its count is its own, from 0, and unseen() of it
    # leaves the first one's be.
    assert contents.saved_since(0, 2, 0) == -1
    contents.unseen(0, 2)
    assert contents.saved_since(0, 1, 0) == 300 + 330
    keys, chars = keys_of(SYSTEM, "a group's question")
    contents.take(0, 2, 0, 3, keys, chars, 7.0)
    assert contents.saved_since(0, 2, 0) == 0
