import random
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from paddler.slots import (
    LAYOUT_VERSION,
    Applied,
    SlotTable,
    SlotTableError,
    UpstreamReport,
    UpstreamState,
)
from paddler.slots.policy import Policy

REPORT = UpstreamReport(
    agent_id="a1",
    name="gpu0",
    host="10.0.0.5",
    port=8081,
    state=UpstreamState.READY,
    slots_total=4,
    slots_idle=4,
    slots_processing=0,
    model="tiny",
    build="b1",
    error="",
    sequence=1,
    interval=1.0,
)


def test_a_report_becomes_a_row_with_every_field(table: SlotTable) -> None:
    assert table.apply_report(REPORT, now=100.0) is Applied.NEW
    (row,) = table.rows()
    assert (row.agent_id, row.name, row.address, row.model, row.build) == (
        "a1",
        "gpu0",
        "10.0.0.5:8081",
        "tiny",
        "b1",
    )
    assert (row.state, row.slots_total, row.slots_idle, row.free_slots) == (
        UpstreamState.READY,
        4,
        4,
        4,
    )
    assert row.age(101.5) == 1.5
    assert not row.is_stale(102.9, missed_reports=3)
    assert row.is_stale(103.1, missed_reports=3)


def test_duplicate_and_out_of_order_reports_are_ignored(table: SlotTable) -> None:
    assert table.apply_report(replace(REPORT, sequence=5, slots_idle=1), now=1.0) is Applied.NEW
    assert table.apply_report(replace(REPORT, sequence=5, slots_idle=4), now=2.0) is Applied.IGNORED
    assert table.apply_report(replace(REPORT, sequence=3, slots_idle=4), now=3.0) is Applied.IGNORED
    (row,) = table.rows()
    assert (row.slots_idle, row.sequence, row.last_report) == (1, 5, 1.0)


def test_a_new_agent_run_for_a_known_upstream_takes_its_row_over(table: SlotTable) -> None:
    table.apply_report(replace(REPORT, sequence=40), now=1.0)
    table.join()
    row = table.rows()[0]
    held = table.reserve(row.index, row.generation)
    assert (
        table.apply_report(replace(REPORT, agent_id="a2", sequence=1), now=2.0) is Applied.UPDATED
    )
    (after,) = table.rows()
    assert (after.index, after.generation, after.agent_id) == (row.index, row.generation, "a2")
    assert after.reservations == 1
    assert held is not None
    table.release(held)
    assert table.rows()[0].reservations == 0


def test_free_slots_count_own_reservations_exactly_and_only_foreign_busy_from_reports(
    table: SlotTable,
) -> None:
    table.join()
    table.apply_report(REPORT, now=1.0)
    row = table.rows()[0]
    held = [table.reserve(row.index, row.generation) for _ in range(2)]
    # The next report sees our 2 requests busy plus 1 of another client.
    table.apply_report(replace(REPORT, sequence=2, slots_idle=1, slots_processing=3), now=2.0)
    row = table.rows()[0]
    assert (row.reservations, row.foreign_busy, row.free_slots) == (2, 1, 1)
    # Our requests end: the slots are free at once, before any report says so.
    for reservation in held:
        assert reservation is not None
        table.release(reservation)
    assert table.rows()[0].free_slots == 3


def test_reserve_refuses_full_unready_and_reassigned_rows(table: SlotTable) -> None:
    table.join()
    table.apply_report(replace(REPORT, slots_total=1, slots_idle=1), now=1.0)
    row = table.rows()[0]
    assert table.reserve(row.index, row.generation + 1) is None
    held = table.reserve(row.index, row.generation)
    assert held is not None
    assert table.reserve(row.index, row.generation) is None
    table.release(held)
    table.apply_report(replace(REPORT, sequence=2, state=UpstreamState.LOADING), now=2.0)
    assert table.reserve(row.index, row.generation) is None


def test_clean_agent_stop_removes_at_once_or_after_draining(table: SlotTable) -> None:
    table.join()
    table.apply_report(REPORT, now=1.0)
    table.apply_report(replace(REPORT, agent_id="b", host="10.0.0.6"), now=1.0)
    busy = table.rows()[1]
    held = table.reserve(busy.index, busy.generation)
    assert held is not None

    assert table.remove_agent("a1") is not None
    assert [row.agent_id for row in table.rows()] == ["b"]
    assert table.remove_agent("b") is not None
    assert table.rows()[0].state is UpstreamState.REMOVED
    assert table.reserve(busy.index, busy.generation) is None
    table.release(held)
    assert [row.name for row in table.expire(now=2.0, forget_after=60)] == ["gpu0"]
    assert table.rows() == []
    assert table.remove_agent("nobody") is None


def test_an_upstream_is_not_forgotten_before_its_agent_missed_its_reports(
    table: SlotTable,
) -> None:
    # An agent that reports every 120 s outlives forget_after = 60 s between reports;
    # it is forgotten only once stale, after 3 missed intervals.
    table.apply_report(replace(REPORT, interval=120.0), now=0.0)
    table.apply_report(replace(REPORT, agent_id="fast", host="10.0.0.9"), now=0.0)
    assert [r.agent_id for r in table.expire(now=100.0, forget_after=60, missed_reports=3)] == [
        "fast"
    ]
    assert [r.agent_id for r in table.rows()] == ["a1"]
    assert table.expire(now=359.0, forget_after=60, missed_reports=3) == []
    assert [r.agent_id for r in table.expire(now=361.0, forget_after=60, missed_reports=3)] == [
        "a1"
    ]
    assert table.rows() == []


def test_silent_upstreams_are_forgotten_and_late_releases_ignored(table: SlotTable) -> None:
    table.join()
    table.apply_report(REPORT, now=1.0)
    row = table.rows()[0]
    held = table.reserve(row.index, row.generation)
    assert held is not None
    assert table.expire(now=30.0, forget_after=60) == []
    assert [r.agent_id for r in table.expire(now=62.0, forget_after=60)] == ["a1"]
    table.apply_report(replace(REPORT, agent_id="new", host="10.0.0.9"), now=63.0)
    reused = table.rows()[0]
    assert (reused.index, reused.generation) == (row.index, row.generation + 1)
    assert table.reserve(reused.index, reused.generation) is not None
    table.release(held)  # from the old upstream: must not touch the new one's count
    assert table.rows()[0].reservations == 1


def test_reservations_of_a_dead_process_are_reclaimed(table: SlotTable, tmp_path: Path) -> None:
    table.apply_report(REPORT, now=1.0)
    row = table.rows()[0]
    code = (
        "from pathlib import Path; from paddler.slots import SlotTable; "
        f"t = SlotTable.open(Path({str(table.path)!r})); t.join(); "
        f"assert t.reserve({row.index}, {row.generation}); "
        f"assert t.reserve({row.index}, {row.generation})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert table.rows()[0].reservations == 2
    assert table.reclaim_dead_owners() == 1
    assert table.rows()[0].reservations == 0


def test_more_processes_than_owner_entries_is_a_clear_error(table: SlotTable) -> None:
    code = (
        "import sys; from pathlib import Path; from paddler.slots import SlotTable, "
        "SlotTableError\n"
        f"tables = [SlotTable.open(Path({str(table.path)!r})) for _ in range(1)]\n"
        "tables[0].join()\n"
        "import time; print('joined', flush=True); time.sleep(30)\n"
    )
    holders = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        for holder in holders:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "joined\n"
        with pytest.raises(SlotTableError, match=r"more than 4 processes use"):
            table.join()
    finally:
        for holder in holders:
            holder.kill()
            holder.communicate()


def test_readers_of_another_layout_version_get_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "slots.table"
    SlotTable.create(path).close()
    with open(path, "r+b") as raw:
        raw.seek(8)
        raw.write(struct.pack("<I", 99))
    with pytest.raises(
        SlotTableError,
        match=rf"layout version 99, but this Paddler reads version {LAYOUT_VERSION}",
    ):
        SlotTable.open(path, readonly=True)


def test_a_file_that_is_not_a_table(tmp_path: Path) -> None:
    path = tmp_path / "other"
    path.write_bytes(b"x" * 8192)
    with pytest.raises(SlotTableError, match="is not a Paddler slot table"):
        SlotTable.open(path)
    with pytest.raises(SlotTableError, match="no slot table at"):
        SlotTable.open(tmp_path / "absent")


def test_a_read_only_reader_sees_rows_and_changes_nothing(table: SlotTable) -> None:
    table.apply_report(REPORT, now=1.0)
    before = table.path.read_bytes()
    reader = SlotTable.open(table.path, readonly=True)
    assert [row.agent_id for row in reader.rows()] == ["a1"]
    reader.close()
    assert table.path.read_bytes() == before


def test_long_texts_are_cut_on_character_boundaries(table: SlotTable) -> None:
    table.apply_report(replace(REPORT, error="é" * 200), now=1.0)
    assert table.rows()[0].error == "é" * 78  # 156 bytes


def test_a_reported_host_cache_size_is_kept_beside_the_texts(table: SlotTable) -> None:
    report = replace(REPORT, host_cache_tokens=0xFFFFFFFF, error="x" * 300)
    table.apply_report(report, now=1.0)
    (row,) = table.rows()
    assert (row.host_cache_tokens, row.error, row.name) == (0xFFFFFFFF, "x" * 156, REPORT.name)
    assert table.host_cache_tokens(row.index) == 0xFFFFFFFF
    table.apply_report(replace(REPORT, sequence=REPORT.sequence + 1), now=2.0)
    assert table.host_cache_tokens(row.index) == table.rows()[0].host_cache_tokens == 0
    assert table.host_cache_tokens(5) == 0  # a row never used


def test_a_row_left_mid_write_by_a_dead_writer_is_repaired_by_the_next_report(
    table: SlotTable,
) -> None:
    table.apply_report(REPORT, now=1.0)
    offset = table._offset(0) // 4
    table._u32[offset] += 1  # what a writer SIGKILLed inside _write leaves behind
    with pytest.raises(SlotTableError, match="stays mid-write"):
        table.rows()
    table.apply_report(replace(REPORT, sequence=2, slots_idle=3), now=2.0)
    assert table.rows()[0].slots_idle == 3


def test_a_process_taking_a_dead_owners_entry_drops_its_place_in_line(tmp_path: Path) -> None:
    table = SlotTable.create(tmp_path / "one-owner", max_owners=1)
    table.apply_report(replace(REPORT, slots_total=0, slots_idle=0), now=1.0)
    code = (
        "import time; from pathlib import Path; from paddler.slots import SlotTable\n"
        f"t = SlotTable.open(Path({str(table.path)!r})); t.join()\n"
        "assert t.enqueue(0, time.monotonic()) is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert table.waiting() == 1
    table.join()  # takes the dead process's owner entry, and must take its tickets out
    assert table.waiting() == 0
    assert table.enqueue(0, 2.0) is not None
    table.close()


def _counters_agree(table: SlotTable) -> None:
    """Each row's kept free count and reservation sum equal what they derive from."""
    for row in table.rows():
        start = table._reservation_index(row.index, 0)
        owners = sum(table._u16[start : start + table.max_owners])
        assert row.reservations == owners, row
        kept_free = table._i16[(table._offset(row.index) + 644) // 2]
        expected = row.slots_total - row.foreign_busy - owners
        assert kept_free == expected, row


def test_kept_counters_follow_every_kind_of_write(tmp_path: Path) -> None:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=8, max_owners=4)
    table.join()
    rng = random.Random(3)
    held = []
    for step in range(600):
        choice = rng.random()
        agent = f"a{rng.randrange(4)}"
        if choice < 0.3:
            busy = rng.randrange(5)
            report = replace(
                REPORT,
                agent_id=agent,
                port=9000 + int(agent[1]),
                slots_processing=busy,
                slots_idle=4 - busy,
                sequence=step + 1,
            )
            table.apply_report(report, now=float(step))
        elif choice < 0.6:
            granted = table.acquire(0, Policy(float(step), 1000, None))
            if granted is not None:
                held.append(granted[0])
        elif choice < 0.85 and held:
            table.release(held.pop(rng.randrange(len(held))))
        elif choice < 0.9:
            table.remove_agent(agent)
        elif choice < 0.95:
            table.expire(float(step), forget_after=50.0)
        else:
            table._clear_owner(0)  # what reclaiming a dead owner does to its counters
            held.clear()
        _counters_agree(table)
    table.close()


def test_a_thousand_upstreams_choose_the_most_free_fresh_one_of_the_model(
    tmp_path: Path,
) -> None:
    table = SlotTable.create(tmp_path / "slots", max_upstreams=1024)
    for index in range(1000):
        table.apply_report(
            replace(
                REPORT,
                agent_id=f"a{index}",
                port=10000 + index,
                model="even" if index % 2 == 0 else "odd",
                slots_idle=1 + index % 3,
                slots_processing=3 - index % 3,
            ),
            now=100.0,
        )
    table.join()
    rows = {row.port - 10000: row for row in table.rows()}
    # 3 free on every index % 3 == 2; the first even such is 2, the first odd is 5.
    assert port(table, Policy(101.0, 3, "even")) == 10002
    excluded = frozenset({(rows[8].index, rows[8].generation)})
    table.eject(rows[14].index, rows[14].generation, 101.0, 60.0, 60.0, lambda *_: False)
    chosen = [port(table, Policy(101.0, 3, "even", excluded)) for _ in range(3)]
    # 2 has 2 free left, ties go to the first; 8 is excluded and 14 ejected.
    assert chosen == [10020, 10026, 10032]
    assert port(table, Policy(101.0, 3, "odd")) == 10005
    # Every upstream but one goes stale; the one that reports again is the only choice.
    table.apply_report(
        replace(
            REPORT,
            agent_id="a999",
            port=10999,
            model="odd",
            sequence=2,
            slots_idle=1,
            slots_processing=3,
        ),
        now=200.0,
    )
    assert port(table, Policy(201.0, 3, "odd")) == 10999
    assert table.acquire(0, Policy(201.0, 3, "odd")) is None  # its one slot is taken
    _counters_agree(table)
    table.close()


def port(table: SlotTable, policy: Policy) -> int | None:
    """The port of the upstream a request gets a slot on, or None."""
    granted = table.acquire(0, policy)
    return None if granted is None else granted[1].port


def test_a_drained_upstream_gets_no_new_request_until_taken_back(table: SlotTable) -> None:
    table.apply_report(REPORT, now=100.0)
    table.apply_report(replace(REPORT, agent_id="a2", name="gpu1", port=8082), now=100.0)
    table.join()
    policy = Policy(100.5, 3)
    first = table.acquire(0, policy)
    assert first is not None
    held, chosen = first
    assert chosen.name == "gpu0"  # the first of two equally free ones

    (drained,) = table.drain(lambda row: row.name == "gpu0", True)
    assert (drained.drained, drained.reservations) == (True, 1)
    # Reports go on and leave the drain as it is; every new request goes elsewhere.
    table.apply_report(replace(REPORT, sequence=2, slots_idle=3, slots_processing=1), now=101.0)
    chosen_now = [table.acquire(0, Policy(101.5, 3)) for _ in range(4)]
    assert [pick[1].name for pick in chosen_now if pick] == ["gpu1"] * 4
    assert table.acquire(0, Policy(101.5, 3)) is None  # gpu1 is full; gpu0 still drained
    # What was in flight on it finishes as usual.
    table.release(held)
    assert next(row for row in table.rows() if row.name == "gpu0").reservations == 0

    table.drain(lambda row: row.name == "gpu0", False)
    back = table.acquire(0, Policy(101.5, 3))
    assert back is not None
    assert back[1].name == "gpu0"


def test_a_freed_row_forgets_its_drain(table: SlotTable) -> None:
    table.apply_report(REPORT, now=100.0)
    table.drain(lambda row: True, True)
    assert table.expire(now=1000.0, forget_after=60.0)
    table.apply_report(replace(REPORT, agent_id="a9"), now=1000.0)
    (row,) = table.rows()
    assert (row.index, row.agent_id, row.drained) == (0, "a9", False)
    assert table.drain(lambda row: row.name == "nobody", True) == []


def test_a_report_measured_before_a_release_does_not_hide_the_freed_slot(
    table: SlotTable,
) -> None:
    table.apply_report(replace(REPORT, slots_total=2, slots_idle=2), now=100.0)
    table.join()
    row = table.rows()[0]
    first = table.reserve(row.index, row.generation)
    second = table.reserve(row.index, row.generation)
    assert first is not None
    assert second is not None
    table.release(first)
    assert table.rows()[0].free_slots == 1
    # The agent looked while both were still running, and its report arrives now.
    busy = replace(REPORT, slots_total=2, slots_idle=0, slots_processing=2, sequence=2)
    table.apply_report(busy, now=100.5)
    assert table.rows()[0].free_slots == 1  # not 0 until the next report
    # The next report sees what llama.cpp runs now: one, ours.
    table.apply_report(replace(busy, slots_idle=1, slots_processing=1, sequence=3), now=101.0)
    assert table.rows()[0].free_slots == 1
    # A busy slot that is not ours still counts.
    table.apply_report(replace(busy, sequence=4), now=101.5)
    assert table.rows()[0].free_slots == 0
    table.release(second)


def test_a_row_is_unchanged_while_its_generation_and_cache_epoch_are(
    table: SlotTable,
) -> None:
    table.apply_report(REPORT, now=1.0)
    (row,) = table.rows()
    assert table.unchanged_since(row.index, row.generation, row.cache_epoch)
    assert not table.unchanged_since(row.index, row.generation + 1, row.cache_epoch)
    table.forget_cache(row.index, row.generation)
    epoch = table.rows()[0].cache_epoch
    assert epoch != row.cache_epoch
    assert table.unchanged_since(row.index, row.generation, epoch)
    assert not table.unchanged_since(row.index, row.generation, row.cache_epoch)
    assert not table.unchanged_since(row.index + 1, 0, 0)  # never used
    table.remove_agent(REPORT.agent_id)
    assert not table.unchanged_since(row.index, row.generation, epoch)  # freed
