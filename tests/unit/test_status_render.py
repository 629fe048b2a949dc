import json
from dataclasses import asdict

from rich.console import Console

from paddler.ctl.status import ProcessInfo, Snapshot, render
from paddler.metrics.traffic import Totals, Traffic, parse_exposition, quantile, totals, traffic


def upstream(name: str, total: int, free: int, state: str = "ready") -> dict[str, object]:
    return {
        "name": name,
        "address": f"10.0.0.{total}:8081",
        "model": "tiny",
        "build": "b4242",
        "state": state,
        "in_rotation": state == "ready",
        "error": "",
        "slots": {"total": total, "idle": free, "processing": total - free, "free": free},
        "reservations": total - free,
        "last_report_age": 0.4,
    }


def cells(line: str) -> list[str]:
    """A table row's cells, as rich draws them between vertical bars."""
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


def snapshot() -> Snapshot:
    return Snapshot(
        upstreams=[
            upstream("gpu0", 2, 1),
            upstream("gpu1", 4, 0),
            upstream("gpu2", 3, 3, state="stale"),
        ],
        queued=5,
        oldest_wait=2.25,
        traffic=Traffic(10.0, 12.5, 0.3, 45.0, 310.0, 0.8125, {"gpu0": 0.75, "gpu1": 0.875}),
        processes=[
            ProcessInfo("paddlerd", 100, 0.0, 20.4, "running"),
            ProcessInfo("balancer", 101, 12.0, 48.0, "running", 0),
            ProcessInfo("llamacpp.gpu0", 0, 0.0, 0.0, "backoff", 3),
        ],
        problems=["no slot table at /run/paddler/x: is the balancer running?"],
    )


def test_a_snapshot_renders_the_fleet_and_the_processes() -> None:
    console = Console(record=True, width=160, color_system=None)
    console.print(render(snapshot()))
    text = console.export_text()
    assert (
        "Fleet: 5/6 slots busy, 5 queued (oldest 2.2s) · 12.5 req/s, 0.3 5xx/s, "
        "p50 45 ms, p99 310 ms, 81% of prompt tokens from cache (last 10s)" in text
    )
    lines = text.splitlines()
    heading = next(line for line in lines if "name" in line and "address" in line)
    header = [cell.strip() for cell in heading.strip().strip("┃").split("┃")]
    gpu0 = next(line for line in lines if "gpu0" in line and "10.0.0" in line)
    assert "10.0.0.2:8081" in gpu0
    assert "█████░░░░░ 1/2" in gpu0
    assert "b4242" in gpu0
    assert cells(gpu0)[header.index("from cache")] == "75%"
    gpu1 = next(line for line in lines if "gpu1" in line)
    assert "██████████ 4/4" in gpu1
    assert cells(gpu1)[header.index("from cache")] == "88%"
    gpu2 = next(line for line in lines if "gpu2" in line)
    assert "stale" in gpu2
    assert cells(gpu2)[header.index("from cache")] == "-"  # answered no prompt in the window
    balancer = next(line for line in lines if "balancer" in line)
    assert cells(balancer)[:4] == ["balancer", "101", "running", "0"]
    assert "48 MB" in balancer
    waiting = next(line for line in lines if "llamacpp.gpu0" in line)
    assert cells(waiting)[:4] == ["llamacpp.gpu0", "-", "backoff", "3"]
    assert "is the balancer running?" in text


def test_the_json_form_carries_the_same_snapshot() -> None:
    parsed = json.loads(json.dumps(asdict(snapshot())))
    assert parsed["queued"] == 5
    assert parsed["traffic"]["requests_per_second"] == 12.5
    assert parsed["processes"][2] == {
        "role": "llamacpp.gpu0",
        "pid": 0,
        "cpu_percent": 0.0,
        "rss_mb": 0.0,
        "state": "backoff",
        "restarts": 3,
    }


def test_rates_and_quantiles_over_a_window() -> None:
    # Counter files keep each bucket's own count; /metrics adds them up.
    before = totals(
        {
            'paddler_requests_total{route="/completion",status="200",upstream="a"}': 10,
            'paddler_request_duration_seconds_bucket{route="/completion",le="0.1"}': 10,
            'paddler_request_duration_seconds_bucket{route="/completion",le="1"}': 0,
            'paddler_request_duration_seconds_bucket{route="/completion",le="+Inf"}': 0,
        },
        at=100.0,
        cumulative=False,
    )
    after = totals(
        parse_exposition(
            "# HELP x\n"
            'paddler_requests_total{route="/completion",status="200",upstream="a"} 100\n'
            'paddler_requests_total{route="/completion",status="502",upstream="a"} 10\n'
            'paddler_request_duration_seconds_bucket{route="/completion",le="0.1"} 60\n'
            'paddler_request_duration_seconds_bucket{route="/completion",le="1"} 110\n'
            'paddler_request_duration_seconds_bucket{route="/completion",le="+Inf"} 110\n'
        ),
        at=110.0,
        cumulative=True,
    )
    flow = traffic(before, after)
    assert (flow.requests_per_second, flow.errors_per_second) == (10.0, 1.0)
    # 100 requests in the window: 50 of at most 0.1 s, 50 between 0.1 and 1 s.
    assert flow.p50_ms == 100.0
    assert flow.p99_ms is not None
    assert round(flow.p99_ms) == 982
    # A balancer restarted between the two readings: its counts start again.
    restarted = traffic(after, Totals(120.0, 5.0, 0.0, {0.1: 5.0, float("inf"): 5.0}))
    assert restarted.requests_per_second == 0.5
    assert restarted.cache_share is None  # no prompt tokens counted


def test_the_share_of_prompt_tokens_from_cache_over_a_window() -> None:
    """From llama.cpp's timings as the balancer counts them (paddler_prompt_tokens_total):
    the tokens of the window only, for the fleet and per upstream."""
    name = "paddler_prompt_tokens_total"
    before = totals(
        {
            f'{name}{{source="cache",upstream="a"}}': 1000,
            f'{name}{{source="processed",upstream="a"}}': 1000,
            f'{name}{{source="processed",upstream="b"}}': 500,
        },
        at=100.0,
        cumulative=False,
    )
    after = totals(
        parse_exposition(
            f'{name}{{source="cache",upstream="a"}} 1900\n'
            f'{name}{{source="processed",upstream="a"}} 1100\n'
            f'{name}{{source="cache",upstream="b"}} 300\n'
            f'{name}{{source="processed",upstream="b"}} 600\n'
            f'{name}{{source="cache",upstream="quiet"}} 0\n'
            f'{name}{{source="processed",upstream="say \\"c\\\\d\\""}} 100\n'
        ),
        at=110.0,
        cumulative=True,
    )
    flow = traffic(before, after)
    # a: 900 of 1,000 from cache; b: 300 of 400; the one with quotes in its name (as
    # /metrics escapes them): none of 100; the fleet: 1,200 of 1,500. quiet: no tokens.
    assert flow.upstream_cache_share == {"a": 0.9, "b": 0.75, 'say "c\\d"': 0.0}
    assert flow.cache_share == 1200 / 1500


def test_a_quantile_beyond_the_last_bucket_is_that_bucket() -> None:
    assert quantile(0.99, {1.0: 10.0, float("inf"): 20.0}) == 1.0
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
