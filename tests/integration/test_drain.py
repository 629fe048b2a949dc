"""paddlerctl drain on a real fleet (2 llama-servers x 2 slots): what runs on the drained
upstream finishes, new requests go elsewhere, --undo takes it back."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.fleet import Fleet, start_fleet
from tests.integration.harness import PaddlerdRunner

pytestmark = pytest.mark.llamacpp


def paddlerctl(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paddler.ctl.cli", "-c", str(fleet.paddlerd.config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def upstream_of_a_new_request(fleet: Fleet) -> str:
    answer = httpx.post(fleet.url("/completion"), json={"prompt": "Hi", "n_predict": 2}, timeout=30)
    assert answer.status_code == 200
    return answer.headers["x-paddler-upstream"]


def test_drain_lets_running_requests_finish_and_sends_new_ones_elsewhere(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = start_fleet(paddlerd, llama_server_binary, {"a": tiny_model, "b": tiny_model})
    assert fleet.wait_idle(4, timeout=30)
    long_stream = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 3500,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", fleet.url("/v1/chat/completions"), json=long_stream) as running,
    ):
        victim = running.headers["x-paddler-upstream"]
        other = "b" if victim == "a" else "a"
        lines = running.iter_lines()
        next(lines)  # under way; it is not read further until the end of the test

        drained = paddlerctl(fleet, "drain", victim)
        assert drained.returncode == 0, drained.stderr
        assert f"{victim} (" in drained.stdout
        assert "draining, 1 request(s) in flight" in drained.stdout
        assert {upstream_of_a_new_request(fleet) for _ in range(6)} == {other}
        assert fleet.agents()[victim]["state"] == "draining"
        assert fleet.health()["upstreams"]["draining"] == 1

        waiting = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "paddler.ctl.cli",
                "-c",
                str(paddlerd.config_path),
                "drain",
                victim,
                "--wait",
                "60",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        assert waiting.poll() is None  # the stream on it is still in flight
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # it finished whole
        out, _ = waiting.communicate(timeout=30)
        assert waiting.returncode == 0
        assert "no request in flight on it" in out

    # Back in rotation: with the other one drained, new requests reach it.
    assert paddlerctl(fleet, "drain", victim, "--undo").returncode == 0
    assert paddlerctl(fleet, "drain", other).returncode == 0
    assert {upstream_of_a_new_request(fleet) for _ in range(3)} == {victim}
    assert paddlerctl(fleet, "drain", other, "--undo").returncode == 0
    assert fleet.health()["slots"]["total"] == 4

    unknown = paddlerctl(fleet, "drain", "nowhere")
    assert unknown.returncode == 1
    assert "no upstream is named 'nowhere'" in unknown.stderr
