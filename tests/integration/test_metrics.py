"""Metrics of a real fleet (2 llama-servers x 2 slots, 2 balancer workers): Prometheus,
StatsD and the autoscaling signal."""

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.fleet import Fleet, scrape, settled, start_fleet
from tests.integration.harness import PaddlerdRunner

pytestmark = pytest.mark.llamacpp


def total(samples: dict[tuple[tuple[str, str], ...], float], **match: str) -> float:
    return sum(
        value
        for labels, value in samples.items()
        if all((name, wanted) in labels for name, wanted in match.items())
    )


def completions(fleet: Fleet, count: int) -> set[str]:
    """``count`` requests, each on a new connection so that both workers take some;
    the workers that answered, told apart by their request ids' per-worker prefix."""
    workers = set()
    for _ in range(count):
        answer = httpx.post(
            fleet.url("/completion"), json={"prompt": "Hi", "n_predict": 2}, timeout=30
        )
        assert answer.status_code == 200
        workers.add(answer.headers["x-request-id"][:12])
    return workers


def test_metrics_count_every_request_across_workers_and_describe_the_fleet(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = start_fleet(paddlerd, llama_server_binary, {"a": tiny_model, "b": tiny_model})
    assert fleet.wait_idle(4, timeout=30)
    workers = completions(fleet, 40)
    assert len(workers) == 2  # spread over both workers
    unknown = httpx.post(fleet.url("/completion"), json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404

    samples = scrape(fleet)
    requests = samples["paddler_requests_total"]
    assert total(requests, route="/completion", status="200") == 40
    assert total(requests, route="/completion", status="404", upstream="none") == 1
    served = [dict(labels) for labels in requests if ("route", "/completion") in labels]
    assert {labels["upstream"] for labels in served if labels["status"] == "200"} <= {"a", "b"}
    duration = samples["paddler_request_duration_seconds_count"]
    assert total(duration, route="/completion") == 41
    buckets = samples["paddler_request_duration_seconds_bucket"]
    assert total(buckets, route="/completion", le="+Inf") == 41
    assert samples["paddler_queue_wait_seconds_count"][()] == 40

    # Gauges, from the slot table at the scrape.
    assert total(samples["paddler_upstream_slots_total"]) == 4
    assert total(samples["paddler_upstream_slots_total"], upstream="a") == 2
    assert samples["paddler_queue_depth"][()] == 0
    assert samples["paddler_upstreams"][(("state", "ready"),)] == 2
    assert max(samples["paddler_upstream_report_age_seconds"].values()) < 2

    # A worker's counts outlive it: Gunicorn's master keeps them when it dies.
    master = fleet.paddlerd.children()["balancer"]
    victim = master.children()[0]
    victim.send_signal(signal.SIGKILL)
    psutil.wait_procs([victim], timeout=10)
    deadline = time.monotonic() + 15
    while len(master.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(master.children()) == 2
    completions(fleet, 4)
    after = scrape(fleet)["paddler_requests_total"]
    assert total(after, route="/completion", status="200") == 44
    kept = {path.name for path in (paddlerd.directory / "slots.metrics").glob("*.counters")}
    assert f"{victim.pid}.counters" not in kept
    assert kept == {"archive.counters", *(f"{w.pid}.counters" for w in master.children())}


def test_streamed_requests_have_a_time_to_first_token_and_their_prompt_tokens_counted(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    # least_busy: prompt tokens are counted whatever the policy (cache_aware's own use of
    # llama.cpp's timings is in test_cache_routing.py).
    fleet = start_fleet(
        paddlerd, llama_server_binary, {"a": tiny_model}, balancer='routing_policy = "least_busy"\n'
    )
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    cached = processed = 0
    for _ in range(3):
        with httpx.stream("POST", fleet.url("/v1/chat/completions"), json=body) as answer:
            assert answer.status_code == 200
            events = [
                json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")
            ]
        timings = [event["timings"] for event in events if "timings" in event]
        cached += timings[-1]["cache_n"]
        processed += timings[-1]["prompt_n"]
    assert cached > 0  # the same prompt again: llama.cpp served most of it from cache
    counted: dict[tuple[tuple[str, str], ...], float] = {
        (("source", "cache"), ("upstream", "a")): cached,
        (("source", "processed"), ("upstream", "a")): processed,
    }
    samples = settled(fleet, "paddler_prompt_tokens_total", counted)
    assert samples["paddler_prompt_tokens_total"] == counted
    first_token = samples["paddler_time_to_first_token_seconds_count"]
    assert total(first_token, route="/v1/chat/completions") == 3
    ttft = total(samples["paddler_time_to_first_token_seconds_sum"])
    whole = total(samples["paddler_request_duration_seconds_sum"], route="/v1/chat/completions")
    assert 0 < ttft <= whole


def test_statsd_receives_the_documented_gauges(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        port = listener.getsockname()[1]
        fleet = start_fleet(
            paddlerd,
            llama_server_binary,
            {"a": tiny_model, "b": tiny_model},
            balancer=f'statsd_address = "127.0.0.1:{port}"\nstatsd_interval = 0.2\n',
        )
        assert fleet.wait_idle(4, timeout=30)
        completions(fleet, 3)
        # StatsD's counts are each worker's new requests per send: added up, they come
        # to what Prometheus counts (the /health polls above included).
        expected = sum(scrape(fleet)["paddler_requests_total"].values())
        gauges: dict[str, float] = {}
        counted = 0.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            counted < expected or gauges.get("paddler.slots_idle") != 4
        ):
            for line in listener.recv(65536).decode().splitlines():
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                if kind == "g":
                    gauges[name] = float(value)
                elif kind == "c" and name == "paddler.requests":
                    counted += float(value)
    assert expected >= 3
    assert counted == expected
    assert gauges["paddler.requests_buffered"] == 0
    assert gauges["paddler.slots_idle"] == 4
    assert gauges["paddler.slots_processing"] == 0
    assert gauges["paddler.upstreams"] == 2


def test_autoscaling_asks_for_an_upstream_while_requests_wait_on_an_empty_fleet(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model},
        agents=False,
        balancer="request_buffer_timeout = 5\n",
    )
    signal_url = f"http://127.0.0.1:{fleet.management}/api/v1/autoscaling"
    assert httpx.get(signal_url).json()["desired_upstreams"] == 0

    statuses: list[int] = []
    waiting = threading.Thread(
        target=lambda: statuses.append(
            httpx.post(fleet.url("/completion"), json={"prompt": "x"}, timeout=30).status_code
        )
    )
    waiting.start()
    deadline = time.monotonic() + 4
    while httpx.get(signal_url).json()["queued"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    wanted = httpx.get(signal_url).json()
    samples = scrape(fleet)
    waiting.join(timeout=30)
    assert wanted["queued"] == 1
    assert wanted["upstreams"] == 0
    assert wanted["desired_upstreams"] == 1
    assert samples["paddler_upstreams_desired"][()] == 1
    assert samples["paddler_queue_depth"][()] == 1
    assert samples["paddler_queue_oldest_wait_seconds"][()] > 0
    # Nobody came: the request timed out, and the metrics say so.
    assert statuses == [504]
    after = scrape(fleet)
    assert after["paddler_queue_timeouts_total"][()] == 1
    assert total(after["paddler_requests_total"], status="504", upstream="none") == 1
