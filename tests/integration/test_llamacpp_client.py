"""What the agent makes of a real llama-server in each of its states."""

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from paddler.llamacpp.client import LlamaCppClient, UpstreamStatus
from paddler.slots import UpstreamState
from paddler.supervisor.spawn import die_with_parent
from paddler.testbed.ports import free_port

pytestmark = pytest.mark.llamacpp

LlamaServer = Callable[..., str]


@pytest.fixture
def llama_server(llama_server_binary: Path, tiny_model: Path) -> Iterator[LlamaServer]:
    """Start llama-server with extra arguments; its base URL once /health answers."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> str:
        port = free_port()
        process = subprocess.Popen(
            [
                str(llama_server_binary),
                "--model",
                str(tiny_model),
                "--port",
                str(port),
                "--parallel",
                "2",
                *([] if "--ctx-size" in extra else ["--ctx-size", "512"]),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # No llama-server outlives the test run, however it ends. The tests start no
            # threads of their own while this runs.
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("llama-server did not start")

    yield start
    for process in started:
        process.kill()
        process.wait()


def status(url: str, api_key: str | None = None) -> UpstreamStatus:
    client = LlamaCppClient(url, api_key, timeout=5)
    try:
        return client.status()
    finally:
        client.close()


def test_ready_server_reports_its_slots_model_and_build(llama_server: LlamaServer) -> None:
    found = status(llama_server())
    assert found.state is UpstreamState.READY
    assert (found.slots_total, found.slots_idle, found.slots_processing) == (2, 2, 0)
    assert found.model.endswith("tiny.gguf")
    assert found.build


def test_api_key_needed_then_given(llama_server: LlamaServer) -> None:
    url = llama_server("--api-key", "k3y")
    refused = status(url)
    assert refused.state is UpstreamState.UNAUTHORIZED
    assert "401" in refused.error
    assert status(url, api_key="k3y").state is UpstreamState.READY


def test_slots_endpoint_disabled(llama_server: LlamaServer) -> None:
    found = status(llama_server("--no-slots"))
    assert found.state is UpstreamState.SLOTS_DISABLED
    assert found.slots_total == 2
    assert "--no-slots" in found.error


def test_busy_slots_come_from_metrics_when_enabled(llama_server: LlamaServer) -> None:
    url = llama_server("--metrics", "--ctx-size", "8192")
    client = LlamaCppClient(url, None, timeout=5)

    def generate() -> None:
        httpx.post(
            f"{url}/completion",
            timeout=60,
            json={"prompt": "x", "n_predict": 3000, "ignore_eos": True},
        )

    generations = [threading.Thread(target=generate) for _ in range(2)]
    for generation in generations:
        generation.start()
    seen: list[UpstreamStatus] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not seen or seen[-1].slots_processing < 2):
        seen.append(client.status())
        time.sleep(0.02)
    for generation in generations:
        generation.join()
    after = client.status()
    client.close()
    assert seen[-1].state is UpstreamState.READY
    assert (seen[-1].slots_total, seen[-1].slots_idle, seen[-1].slots_processing) == (2, 0, 2)
    assert (after.slots_idle, after.slots_processing) == (2, 0)


def test_a_server_watched_by_the_agent_still_falls_asleep_and_stays_so(
    llama_server: LlamaServer,
) -> None:
    url = llama_server("--metrics", "--sleep-idle-seconds", "1")
    client = LlamaCppClient(url, None, timeout=5)
    deadline = time.monotonic() + 15
    found = client.status()
    # Polled as often as an agent with a short interval does, it still falls asleep.
    while found.state is not UpstreamState.ASLEEP and time.monotonic() < deadline:
        time.sleep(0.2)
        found = client.status()
    assert found.state is UpstreamState.ASLEEP
    assert found.slots_total == 2
    # Watching it as the agent does, several times, does not wake it.
    for _ in range(5):
        time.sleep(0.3)
        assert client.status().state is UpstreamState.ASLEEP
    client.close()
    assert httpx.get(f"{url}/props", timeout=5).json()["is_sleeping"] is True


def test_nothing_listening() -> None:
    found = status(f"http://127.0.0.1:{free_port()}")
    assert found.state is UpstreamState.UNREACHABLE
    assert found.error.startswith("cannot reach http://127.0.0.1:")


def test_something_that_is_not_llama_server(llama_server: LlamaServer) -> None:
    url = llama_server()
    # The model file as /props: a server that answers 200 with something else.
    assert status(url + "/v1").state is UpstreamState.ERROR
