"""The balancer's proxy in front of real llama-servers (2 servers x 2 slots)."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from paddler.testbed.models import write_model
from tests.integration.fleet import Fleet, start_fleet
from tests.integration.harness import PaddlerdRunner

pytestmark = pytest.mark.llamacpp


@pytest.fixture
def fleet(paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path) -> Fleet:
    return start_fleet(paddlerd, llama_server_binary, {"a": tiny_model, "b": tiny_model})


def chat(tokens: int, stream: bool = False, **extra: object) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
        **extra,
    }


class DeferralWatch:
    """Samples every llama-server's requests_deferred while a test runs."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.highest = 0
        self.busiest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in self.fleet.servers:
                self.highest = max(self.highest, self.fleet.deferred(name))
                self.busiest = max(self.busiest, self.fleet.busy_slots(name))
            time.sleep(0.02)

    def __enter__(self) -> "DeferralWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def stream_chat(url: str, tokens: int) -> tuple[int, float, float, str, float]:
    """Status, first-byte time, end time, the last data line of a streamed chat, and
    how long the balancer says it waited for a slot (ms)."""
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("POST", url, json=chat(tokens, stream=True)) as response,
    ):
        first = end = 0.0
        last = ""
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                if not first:
                    first = time.monotonic()
                last = line
        end = time.monotonic()
        queued = float(response.headers["x-paddler-queue-ms"])
        return response.status_code, first, end, last, queued


def test_twelve_streams_on_four_slots_never_overbook_and_queue_fairly(fleet: Fleet) -> None:
    async def run() -> list[tuple[int, float, float, str, float]]:
        return await asyncio.gather(
            *(stream_chat(fleet.url("/v1/chat/completions"), 600) for _ in range(12))
        )

    with DeferralWatch(fleet) as watch:
        results = asyncio.run(run())
    assert [status for status, *_ in results] == [200] * 12, fleet.paddlerd.log()[-6000:]
    assert all(last == "data: [DONE]" for *_, last, _ in results)
    # llama.cpp never had to queue a request itself: at most 2 in flight per server.
    assert watch.highest == 0
    assert watch.busiest <= 2
    # Queued requests start as soon as slots free: the 5th start comes right after the
    # 1st end, the 6th after the 2nd, and so on (no report interval in between).
    starts = sorted(first for _, first, *_ in results)
    ends = sorted(end for _, _, end, *_ in results)
    gaps = [starts[i] - ends[i - 4] for i in range(4, 12)]
    assert max(gaps) < 0.25, (gaps, sorted((round(f, 2), round(e, 2)) for _, f, e, *_ in results))
    # The balancer's account of the wait (X-Paddler-Queue-Ms) agrees: four went at once,
    # eight waited for one of the first four streams to end.
    waits = sorted(queued for *_, queued in results)
    shortest = min(end - first for _, first, end, *_ in results)
    assert max(waits[:4]) < 50, waits
    assert min(waits[4:]) > 1000 * shortest / 2, (waits, shortest)
    assert fleet.health()["queued"] == 0


def test_full_buffer_answers_503_for_exactly_the_overflow(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model, "b": tiny_model},
        balancer="request_buffer_size = 4\n",
        # Reports once a second: two busy llama-servers on two cores must not starve the
        # agents into missing three reports in a row (their upstreams would turn stale).
        interval=1.0,
    )

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(fleet.url("/v1/chat/completions"), json=chat(1500))
                    for _ in range(12)
                )
            )

    responses = asyncio.run(run())
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 8 + [503] * 4, fleet.paddlerd.log()[-6000:]
    refused = [r for r in responses if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert (
        refused[0]
        .json()["error"]["message"]
        .startswith("every slot is busy and the request buffer is full")
    )


def test_requests_wait_for_an_upstream_to_join_or_time_out(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model},
        agents=False,
        balancer="request_buffer_timeout = 3.0\n",
    )
    assert fleet.health()["slots"] == {"idle": 0, "processing": 0, "total": 0}

    started = time.monotonic()
    timed_out = httpx.post(fleet.url("/v1/chat/completions"), json=chat(4), timeout=30)
    assert timed_out.status_code == 504
    assert time.monotonic() - started >= 3.0

    answer: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answer.append(
            httpx.post(fleet.url("/v1/chat/completions"), json=chat(4), timeout=30)
        )
    )
    waiting.start()
    time.sleep(1.0)
    assert fleet.health()["queued"] == 1
    # An agent joins (as an autoscaler's new host would): the waiting request goes there.
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paddler",
            "agent",
            "--local-llamacpp-port",
            str(fleet.servers["a"]),
            "--management-port",
            str(fleet.management),
            "--monitoring-interval",
            "0.3",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        waiting.join(20)
        assert answer[0].status_code == 200
        assert answer[0].json()["choices"][0]["finish_reason"] == "length"
    finally:
        agent.terminate()
        agent.wait(10)


@contextmanager
def long_stream(fleet: Fleet) -> Iterator[tuple[str, Iterator[str]]]:
    """A streamed chat long enough to act on mid-stream: its upstream, and its lines."""
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", fleet.url("/v1/chat/completions"), json=chat(3000, stream=True)
        ) as response,
    ):
        yield response.headers["x-paddler-upstream"], response.iter_lines()


def test_a_client_leaving_mid_stream_frees_its_slot(fleet: Fleet) -> None:
    with long_stream(fleet) as (upstream, lines):
        for _ in range(5):
            next(lines)
        assert fleet.busy_slots(upstream) == 1
        left = time.monotonic()
    # The connection is closed: llama.cpp stops generating and the reservation goes.
    while fleet.busy_slots(upstream) and time.monotonic() - left < 5:
        time.sleep(0.02)
    assert time.monotonic() - left < 1.0
    deadline = time.monotonic() + 2
    while fleet.agents()[upstream]["reservations"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fleet.agents()[upstream]["reservations"] == 0
    # The busy slot the last report saw is free again by the next one.
    assert fleet.wait_idle(4, timeout=0.3 + 0.5)


def test_stopping_paddlerd_lets_a_stream_in_flight_finish(fleet: Fleet) -> None:
    with long_stream(fleet) as (_, lines):
        for _ in range(5):
            next(lines)
        fleet.paddlerd.signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert len(rest) > 100  # the stream went on after the signal, not just its last event
    assert fleet.paddlerd.wait_exit() == 0
    assert "Bad file descriptor" not in fleet.paddlerd.log()  # each socket closed once


def test_a_llama_server_killed_before_answering_is_retried_elsewhere(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    # Slow reports and a long restart back-off: the table still thinks it is ready.
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model, "b": tiny_model},
        interval=5.0,
        paddlerd_extra="backoff_max = 30.0\n",
    )
    # Both in the table first: with only one there, requests wait for the other to join
    # while the killed one's agent reports it gone, and nothing is tried on it at all.
    assert fleet.wait_idle(4, timeout=30)
    # Killed just after a report of its agent, so that the next one (which would take it
    # out of rotation) is an interval away: when b joins an interval after a, a's next
    # report comes at that very moment otherwise.
    fleet.wait_for_report("a")
    fleet.paddlerd.children()[f"llamacpp :{fleet.servers['a']}"].send_signal(signal.SIGKILL)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(fleet.url("/v1/chat/completions"), json=chat(8)) for _ in range(4))
            )

    responses = asyncio.run(run())
    assert [response.status_code for response in responses] == [200] * 4
    assert {response.headers["x-paddler-upstream"] for response in responses} == {"b"}
    balancer = "\n".join(line for line in fleet.paddlerd.log().splitlines() if "[balancer]" in line)
    # Refused while dead, reset while its socket was still closing, or (after paddlerd's
    # back-off restarted it) a 503 while it loads its model: each a failure before the
    # first byte, and the request went elsewhere.
    assert "a (127.0.0.1:" in balancer.replace("upstream a (127.0.0.1:", "")
    failures = ("cannot connect", "closed before an answer", "503: it is loading")
    assert any(failure in balancer for failure in failures), balancer
    assert "; trying another upstream" in balancer


def test_a_llama_server_killed_mid_stream_ends_the_stream_with_an_error(fleet: Fleet) -> None:
    with long_stream(fleet) as (upstream, lines):
        for _ in range(3):
            next(lines)
        fleet.paddlerd.children()[f"llamacpp :{fleet.servers[upstream]}"].send_signal(
            signal.SIGKILL
        )
        rest = [line for line in lines if line.startswith("data: ")]
    error = json.loads(rest[-1].removeprefix("data: "))
    assert error["error"]["type"] == "upstream_error"
    assert f"upstream {upstream} failed" in error["error"]["message"]
    fleet.paddlerd.wait_for_log(rf"ejected upstream {upstream} \(127\.0\.0\.1:\d+\) for 5s")
    # The other upstream serves meanwhile.
    answer = httpx.post(fleet.url("/v1/chat/completions"), json=chat(4), timeout=30)
    assert answer.status_code == 200
    assert answer.headers["x-paddler-upstream"] != upstream


def test_a_worker_killed_holding_reservations_gives_them_back(fleet: Fleet) -> None:
    def balancer_workers() -> list[psutil.Process]:
        master = fleet.paddlerd.children()["balancer"]
        return master.children()

    streams: list[Iterator[str]] = []
    clients = [httpx.Client(timeout=60) for _ in range(4)]
    contexts = [
        client.stream("POST", fleet.url("/v1/chat/completions"), json=chat(3000, stream=True))
        for client in clients
    ]
    try:
        for context in contexts:
            response = context.__enter__()
            lines = response.iter_lines()
            next(lines)
            streams.append(lines)
        held = sum(int(str(agent["reservations"])) for agent in fleet.agents().values())
        assert held == 4
        victims = [
            worker
            for worker in balancer_workers()
            if any(
                c.status == psutil.CONN_ESTABLISHED
                and c.raddr
                and c.raddr.port in fleet.servers.values()
                for c in worker.net_connections()
            )
        ]
        assert victims
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # Gunicorn's child_exit (and the workers' reclaim pass) hand the slots back.
        while time.monotonic() - killed < 5:
            if sum(int(str(a["reservations"])) for a in fleet.agents().values()) < held:
                break
            time.sleep(0.02)
        assert time.monotonic() - killed < 0.3 + 0.5
    finally:
        for context in contexts:
            context.__exit__(None, None, None)
        for client in clients:
            client.close()
    assert fleet.wait_idle(4, timeout=5)
    answer = httpx.post(fleet.url("/v1/chat/completions"), json=chat(4), timeout=30)
    assert answer.status_code == 200


def test_two_models_each_request_reaches_its_model(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path, tmp_path: Path
) -> None:
    other = write_model(tmp_path / "other.gguf", "tiny", seed=7)
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model, "b": other},
        aliases={"a": "alpha", "b": "beta"},
    )
    models = httpx.get(fleet.url("/v1/models"), timeout=5).json()
    assert [model["id"] for model in models["data"]] == ["alpha", "beta"]
    for _ in range(4):
        for model, upstream in (("alpha", "a"), ("beta", "b")):
            answer = httpx.post(
                fleet.url("/v1/chat/completions"), json=chat(4, model=model), timeout=30
            )
            assert answer.status_code == 200
            assert answer.headers["x-paddler-upstream"] == upstream
    unknown = httpx.post(fleet.url("/v1/chat/completions"), json=chat(4, model="gamma"), timeout=30)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == (
        "model 'gamma' is not served here; the models are: alpha, beta"
    )


def test_bad_input(fleet: Fleet) -> None:
    malformed = httpx.post(fleet.url("/v1/chat/completions"), content=b'{"messages": [', timeout=10)
    assert malformed.status_code == 400
    assert malformed.json()["error"]["message"].startswith("the request body is not valid JSON")
    huge = httpx.post(fleet.url("/v1/chat/completions"), content=b"x" * 50_000_000, timeout=60)
    assert huge.status_code == 413
    hidden = httpx.get(fleet.url("/slots"), timeout=10)
    assert hidden.status_code == 404
    # Nothing of that disturbed the fleet.
    assert (
        httpx.post(fleet.url("/v1/chat/completions"), json=chat(4), timeout=30).status_code == 200
    )
    assert "x-request-id" in malformed.headers


def test_the_official_openai_client_and_curl_work_unchanged(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=fleet.url("/v1"), api_key="unused", max_retries=0)
    models = [model.id for model in client.models.list()]
    assert models == ["tiny"]
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) >= 1
    client.close()

    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            fleet.url("/v1/chat/completions"),
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert curl.returncode == 0, curl.stderr
    assert json.loads(curl.stdout)["choices"][0]["finish_reason"] == "length"
    native = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            fleet.url("/completion"),
            "-d",
            '{"prompt": "hello", "n_predict": 4}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(native.stdout)["tokens_predicted"] == 4


def test_clients_trickling_their_headers_are_cut_off_without_slowing_others(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = start_fleet(
        paddlerd, llama_server_binary, {"a": tiny_model}, balancer="header_timeout = 2.0\n"
    )

    def latency() -> float:
        started = time.monotonic()
        assert (
            httpx.post(fleet.url("/tokenize"), json={"content": "hello"}, timeout=10).status_code
            == 200
        )
        return time.monotonic() - started

    baseline = sorted(latency() for _ in range(20))[10]
    tricklers = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", fleet.proxy))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        tricklers.append(sock)
    started = time.monotonic()
    during = []
    closed: set[int] = set()
    while len(closed) < len(tricklers) and time.monotonic() - started < 10:
        for number, sock in enumerate(tricklers):
            if number in closed:
                continue
            try:
                sock.sendall(b"X")  # one byte of a header, now and then
                sock.settimeout(0.001)
                if sock.recv(1) == b"":
                    closed.add(number)
            except TimeoutError:
                pass
            except OSError:
                closed.add(number)
        during.append(latency())
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    for sock in tricklers:
        sock.close()
    assert len(closed) == len(tricklers)
    assert 2.0 <= elapsed < 4.0
    assert sorted(during)[len(during) // 2] < baseline * 3 + 0.05
    fleet.paddlerd.wait_for_log(
        r"closed the connection of 127\.0\.0\.1:\d+: its request "
        r"headers took over 2s"
    )


def test_client_keys_are_checked_and_the_upstream_key_injected(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model},
        llama_api_key="upstream-secret",
        balancer='api_keys = ["client-one", "client-two"]\nupstream_api_key = "upstream-secret"\n',
    )
    url = fleet.url("/v1/chat/completions")
    refused = httpx.post(url, json=chat(4), timeout=30)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(url, json=chat(4), headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    # The llama-server wants its own key, which only the balancer knows.
    direct = httpx.post(
        f"http://127.0.0.1:{fleet.servers['a']}/v1/chat/completions",
        json=chat(4),
        headers={"Authorization": "Bearer client-one"},
        timeout=30,
    )
    assert direct.status_code == 401
    bearer = httpx.post(
        url, json=chat(4), headers={"Authorization": "Bearer client-one"}, timeout=30
    )
    assert bearer.status_code == 200
    header = httpx.post(url, json=chat(4), headers={"X-Api-Key": "client-two"}, timeout=30)
    assert header.status_code == 200
    assert httpx.get(fleet.url("/health"), timeout=10).status_code == 200


def test_paddlerctl_status_shows_the_fleet(fleet: Fleet) -> None:
    def paddlerctl(*arguments: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "paddler.ctl.cli",
                "-c",
                str(fleet.paddlerd.config_path),
                "status",
                *arguments,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "COLUMNS": "160"},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    frame = paddlerctl("--once")
    assert "Fleet: 0/4 slots busy, 0 queued" in frame
    for name in ("a", "b"):
        row = next(line for line in frame.splitlines() if f"│ {name} " in line)
        assert "ready" in row
        assert "0/2" in row
    snapshot = json.loads(paddlerctl("--json"))
    assert sorted(u["name"] for u in snapshot["upstreams"]) == ["a", "b"]
    assert {u["slots"]["total"] for u in snapshot["upstreams"]} == {2}
    roles = {process["role"]: process for process in snapshot["processes"]}
    assert snapshot["processes"][0]["role"] == "paddlerd"
    # paddlerd's children under their names, with paddlerd's own word on their state.
    for child in ("balancer", "llamacpp.a", "llamacpp.b", "agent.a", "agent.b"):
        assert roles[child]["state"] == "running"
        assert roles[child]["restarts"] == 0
        assert roles[child]["pid"] > 0
    assert snapshot["traffic"] is not None

    # From elsewhere: the management API and /metrics, no slot table, no processes.
    remote = json.loads(
        paddlerctl("--json", "--management", f"http://127.0.0.1:{fleet.management}")
    )
    assert sorted(u["name"] for u in remote["upstreams"]) == ["a", "b"]
    assert remote["processes"] == []
    assert remote["problems"] == []
    assert remote["traffic"]["errors_per_second"] == 0


def test_one_worker_serves_the_management_api_and_another_takes_over_when_it_dies(
    fleet: Fleet,
) -> None:
    def serving() -> list[psutil.Process]:
        """The workers with agents' connections to the management port open."""
        master = fleet.paddlerd.children()["balancer"]
        return [
            worker
            for worker in master.children()
            if any(
                c.status == psutil.CONN_ESTABLISHED and c.laddr.port == fleet.management
                for c in worker.net_connections()
            )
        ]

    assert len(fleet.paddlerd.children()["balancer"].children()) == 2
    holders = serving()
    assert len(holders) == 1  # both agents report to the same one of the two workers
    holders[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    # The listening socket queues what arrives meanwhile: this request waits, not fails.
    assert len(fleet.agents()) == 2
    took_over = time.monotonic() - killed
    assert took_over < 2.0
    deadline = time.monotonic() + 5
    while not (new := serving()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert new
    assert new[0].pid != holders[0].pid
    # The agents reconnected and their reports are taken: nobody fell out of rotation.
    assert fleet.wait_idle(4, timeout=5)
    ages = [float(str(agent["last_report_age"])) for agent in fleet.agents().values()]
    assert max(ages) < 1.0
    assert fleet.paddlerd.log().count("serves the management API") >= 2
