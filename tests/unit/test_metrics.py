"""The balancer's metrics: counter files, Prometheus's format, demand, StatsD packets."""

from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from paddler.balancer.fleet import Fleet
from paddler.config import BalancerSettings
from paddler.metrics import counters
from paddler.metrics.counters import CounterFile, read_all, read_file
from paddler.metrics.demand import demand
from paddler.metrics.exposition import FleetSnapshot, render
from paddler.metrics.recorder import Recorder
from paddler.metrics.statsd import StatsdSender, gauges
from paddler.prefixes.index import PrefixIndex
from paddler.slots import SlotTable, UpstreamRow, UpstreamState
from paddler.slots.view import in_rotation, state_name


def row(index: int, name: str, total: int, processing: int, reserved: int = 0) -> UpstreamRow:
    return UpstreamRow(
        index=index,
        generation=1,
        state=UpstreamState.READY,
        agent_id=f"agent-{index}",
        name=name,
        host="127.0.0.1",
        port=9000 + index,
        model="tiny",
        build="b1",
        error="",
        slots_total=total,
        slots_idle=total - processing,
        slots_processing=processing,
        reserved_at_report=0,
        reservations=reserved,
        last_report=99.5,
        first_report=10.0,
        interval=1.0,
        sequence=1,
    )


def snapshot(rows: list[UpstreamRow], queued: int = 0) -> FleetSnapshot:
    return FleetSnapshot(
        rows=rows,
        states={r.index: "ready" for r in rows},
        queued=queued,
        oldest_wait=0.25 if queued else 0.0,
        demand=demand(rows, queued, 100.0, 3),
        now=100.0,
    )


def test_counts_of_every_process_add_up(tmp_path: Path) -> None:
    counters.prepare(tmp_path)
    first = CounterFile.create(tmp_path / "1.counters")
    second = CounterFile.create(tmp_path / "2.counters")
    first.add("a_total", 2)
    second.add("a_total")
    second.add('b_total{upstream="x"}', 0.5)
    first.add("a_total")
    assert read_all(tmp_path) == {"a_total": 4.0, 'b_total{upstream="x"}': 0.5}


def test_a_counter_file_grows_past_its_first_size(tmp_path: Path) -> None:
    file = CounterFile.create(tmp_path / "1.counters")
    keys = [f'k_total{{upstream="{"u" * 40}{n}"}}' for n in range(3000)]  # ~200 KB
    for key in keys:
        file.add(key)
    file.add(keys[0])
    values = read_file(tmp_path / "1.counters")
    assert len(values) == 3000
    assert values[keys[0]] == 2.0
    assert values[keys[-1]] == 1.0


def test_a_dead_process_counts_are_folded_into_the_archive_once(tmp_path: Path) -> None:
    counters.prepare(tmp_path)
    live = CounterFile.create(tmp_path / "1.counters")
    dead = CounterFile.create(tmp_path / "2.counters")
    live.add("r_total", 3)
    dead.add("r_total", 5)
    dead.close()
    counters.fold(tmp_path, tmp_path / "2.counters")
    assert not (tmp_path / "2.counters").exists()
    assert read_all(tmp_path) == {"r_total": 8.0}
    again = CounterFile.create(tmp_path / "3.counters")
    again.add("r_total")
    again.close()
    counters.fold(tmp_path, tmp_path / "3.counters")
    assert read_all(tmp_path) == {"r_total": 9.0}


def test_a_torn_or_foreign_file_reads_as_what_it_holds_whole(tmp_path: Path) -> None:
    file = CounterFile.create(tmp_path / "1.counters")
    file.add("a_total", 7)
    data = (tmp_path / "1.counters").read_bytes()
    (tmp_path / "short.counters").write_bytes(data[:20])
    (tmp_path / "junk.counters").write_bytes(b"not a counter file at all")
    assert read_file(tmp_path / "short.counters") == {}
    assert read_file(tmp_path / "junk.counters") == {}
    assert read_file(tmp_path / "gone.counters") == {}


def test_prometheus_reads_the_exposition(tmp_path: Path) -> None:
    file = CounterFile.create(tmp_path / "1.counters")
    recorder = Recorder(file)
    recorder.request("/completion", 200, "a", 0.02, None)
    recorder.request("/completion", 200, "a", 3.0, 0.4)
    recorder.request("/completion", 503, "none", 0.001, None)
    recorder.request("other", 404, 'we"ird\\name', 0.001, None)
    recorder.queue_wait(0.0)
    recorder.retried("b")
    text = render(file.values, snapshot([row(0, "a", 4, 1), row(1, "b", 4, 0)], queued=2))

    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    route = (("route", "/completion"),)
    assert samples[("paddler_request_duration_seconds_bucket", (("le", "0.01"), *route))] == 1
    assert samples[("paddler_request_duration_seconds_bucket", (("le", "0.025"), *route))] == 2
    assert samples[("paddler_request_duration_seconds_bucket", (("le", "5"), *route))] == 3
    assert samples[("paddler_request_duration_seconds_bucket", (("le", "+Inf"), *route))] == 3
    assert samples[("paddler_request_duration_seconds_count", route)] == 3
    assert samples[("paddler_request_duration_seconds_sum", route)] == pytest.approx(3.021)
    assert samples[("paddler_time_to_first_token_seconds_count", route)] == 1
    weird = (("route", "other"), ("status", "404"), ("upstream", 'we"ird\\name'))
    assert samples[("paddler_requests_total", weird)] == 1
    assert samples[("paddler_retries_total", (("upstream", "b"),))] == 1
    assert samples[("paddler_queue_timeouts_total", ())] == 0
    assert samples[("paddler_queue_depth", ())] == 2
    labels_a = (("address", "127.0.0.1:9000"), ("model", "tiny"), ("upstream", "a"))
    assert samples[("paddler_upstream_slots_busy", labels_a)] == 1
    assert samples[("paddler_upstream_slots_idle", labels_a)] == 3
    assert samples[("paddler_upstream_report_age_seconds", labels_a)] == 0.5
    # 1 busy slot and 2 waiting requests, 4 slots an upstream: one upstream is enough.
    assert samples[("paddler_upstreams_desired", ())] == 1
    assert samples[("paddler_slots_utilization", ())] == 3 / 8
    assert families["paddler_request_duration_seconds"].type == "histogram"


def test_cache_counters_reach_the_exposition(tmp_path: Path) -> None:
    file = CounterFile.create(tmp_path / "1.counters")
    recorder = Recorder(file)
    recorder.prompt_tokens("a", 600, 40)
    recorder.prompt_tokens("a", 0, 700)
    recorder.prompt_tokens("b", 12, -1)  # timings without prompt_n: only the cached
    recorder.holder_wait("freed", 0.25)
    recorder.holder_wait("freed", 0.5)
    recorder.holder_wait("expired", 2.0)
    recorder.slot_naming("named")
    recorder.slot_naming("off")
    recorder.slot_naming("named")
    text = render(file.values, snapshot([row(0, "a", 4, 0)], queued=0))

    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    tokens = "paddler_prompt_tokens_total"
    assert samples[(tokens, (("source", "cache"), ("upstream", "a")))] == 600
    assert samples[(tokens, (("source", "processed"), ("upstream", "a")))] == 740
    assert samples[(tokens, (("source", "cache"), ("upstream", "b")))] == 12
    assert samples[(tokens, (("source", "processed"), ("upstream", "b")))] == 0
    waits = "paddler_cache_holder_waits_total"
    assert samples[(waits, (("outcome", "freed"),))] == 2
    assert samples[(waits, (("outcome", "expired"),))] == 1
    seconds = "paddler_cache_holder_wait_seconds_total"
    assert samples[(seconds, (("outcome", "freed"),))] == pytest.approx(0.75)
    naming = "paddler_cache_slot_naming_total"
    assert samples[(naming, (("outcome", "named"),))] == 2
    assert samples[(naming, (("outcome", "off"),))] == 1
    assert families["paddler_prompt_tokens"].type == "counter"


@pytest.mark.parametrize(
    ("rows", "queued", "desired"),
    [
        ([], 0, 0),  # nothing to do, nothing wanted
        ([], 3, 1),  # scale from zero: waiting requests want one upstream
        ([row(0, "a", 4, 0)], 0, 0),
        ([row(0, "a", 4, 4)], 0, 1),
        ([row(0, "a", 4, 4), row(1, "b", 4, 4)], 3, 3),  # 11 slots' worth over 4 each
        ([row(0, "a", 4, 2), row(1, "b", 2, 0)], 0, 1),  # 2 busy over 3 a piece
    ],
)
def test_demand_counts_busy_slots_and_waiting_requests(
    rows: list[UpstreamRow], queued: int, desired: int
) -> None:
    assert demand(rows, queued, 100.0, 3).desired_upstreams == desired


def test_utilization_is_demand_over_the_slots_in_rotation() -> None:
    assert demand([row(0, "a", 4, 4), row(1, "b", 4, 2)], 2, 100.0, 3).utilization == 1.0
    assert demand([row(0, "a", 4, 1)], 0, 100.0, 3).utilization == 0.25
    assert demand([], 2, 100.0, 3).utilization == 1.0
    assert demand([], 0, 100.0, 3).utilization == 0.0


def test_stale_upstreams_bring_no_capacity() -> None:
    stale = row(0, "a", 4, 0)
    stale.last_report = 50.0  # silent for 50 report intervals
    wanted = demand([stale], 2, 100.0, 3)
    assert (wanted.upstreams, wanted.desired_upstreams) == (0, 1)


def test_an_ejected_upstream_is_out_of_rotation_until_its_ejection_ends() -> None:
    ejected = row(0, "a", 4, 0)
    ejected.ejected_until = 105.0  # the monotonic clock the table keeps
    assert (state_name(ejected, 100.0, 3), in_rotation(ejected, 100.0, 3)) == ("ejected", False)
    wanted = demand([ejected, row(1, "b", 4, 4)], 0, 100.0, 3)
    assert (wanted.upstreams, wanted.desired_upstreams) == (1, 1)
    ejected.last_report = 105.5
    assert (state_name(ejected, 106.0, 3), in_rotation(ejected, 106.0, 3)) == ("ready", True)
    # What its agent reports, when not ready, says more than the ejection.
    ejected.state = UpstreamState.UNREACHABLE
    assert state_name(ejected, 100.0, 3) == "unreachable"


def test_statsd_packets_carry_gauges_and_only_new_counts(tmp_path: Path) -> None:
    file = CounterFile.create(tmp_path / "1.counters")
    recorder = Recorder(file)
    fleet = snapshot([row(0, "a", 4, 1)], queued=1)
    sender = StatsdSender("127.0.0.1", 8125, "paddler", 1.0, lambda: fleet, file)
    recorder.request("/completion", 200, "a", 0.1, None)
    recorder.request("/completion", 502, "a", 0.1, None)
    first = sender.next_packet().decode().splitlines()
    assert "paddler.requests_buffered:1|g" in first
    assert "paddler.slots_idle:3|g" in first
    assert "paddler.slots_processing:1|g" in first
    assert "paddler.requests:2|c" in first
    assert "paddler.requests_failed:1|c" in first
    recorder.request("/completion", 200, "a", 0.1, None)
    recorder.prompt_tokens("a", 900, 100)
    recorder.prompt_tokens("b", 0, 50)
    recorder.holder_wait("freed", 0.2)
    recorder.holder_wait("expired", 1.0)
    second = sender.next_packet().decode().splitlines()
    assert "paddler.requests:1|c" in second
    assert not [line for line in second if line.startswith("paddler.requests_failed")]
    # The cache share, summed over upstreams, and the waits for a busy holder.
    assert "paddler.prompt_tokens_cached:900|c" in second
    assert "paddler.prompt_tokens_processed:150|c" in second
    assert "paddler.cache_holder_waits:2|c" in second
    recorder.prompt_tokens("a", 0, 10)
    third = sender.next_packet().decode().splitlines()
    assert "paddler.prompt_tokens_processed:10|c" in third
    assert not [line for line in third if line.startswith("paddler.prompt_tokens_cached")]


def test_what_cache_aware_learned_is_a_gauge_of_every_worker(tmp_path: Path) -> None:
    """The trusts that turn spare copies on and off, and the prefill rate that bounds a
    wait for a busy holder, as the prefix index has them: an operator sees why requests
    wait for a holder or go to a copy. None under a policy that keeps no index."""
    table_path = tmp_path / "slots"
    SlotTable.create(table_path, max_upstreams=4, max_owners=4).close()
    index = PrefixIndex.create(Path(f"{table_path}.prefixes"), sets=64)
    index.copy_trust = 0.375
    index.host_trust = 0.625
    index.prefill_rate = 0.0005
    settings = BalancerSettings(routing_policy="cache_aware", slot_table=str(table_path))
    fleet = Fleet(settings)
    fleet.attach()
    try:
        snapshot = fleet.snapshot()
        text = render({}, snapshot)
        assert "paddler_cache_copy_trust 0.375\n" in text
        assert "paddler_cache_host_trust 0.625\n" in text
        assert "paddler_cache_prefill_seconds_per_character 0.0005\n" in text
        assert "# TYPE paddler_cache_host_trust gauge" in text
        sent = gauges(snapshot)
        assert (sent["cache_copy_trust"], sent["cache_host_trust"]) == (0.375, 0.625)
    finally:
        fleet.detach()
    least_busy = Fleet(replace(settings, routing_policy="least_busy"))
    least_busy.attach()
    try:
        assert "paddler_cache_host_trust" not in render({}, least_busy.snapshot())
        assert "cache_host_trust" not in gauges(least_busy.snapshot())
    finally:
        least_busy.detach()
    index.close()
