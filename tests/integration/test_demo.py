"""The README's first command: the demo fleet answers the README's calls."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from paddler.testbed.ports import free_port

pytestmark = pytest.mark.llamacpp


def test_the_demo_fleet_serves_the_readme_calls(llama_server_binary: Path, tmp_path: Path) -> None:
    base = free_port()  # the demo takes this port and the five after it
    while base > 65000:
        base = free_port()
    env = {
        **os.environ,
        "PADDLER_CACHE_DIR": str(tmp_path),
        "PADDLER_LLAMA_SERVER": str(llama_server_binary),
    }
    with open(tmp_path / "demo.log", "wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "paddler.testbed.demo", "--base-port", str(base)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{base}/health", timeout=2).json()["slots"]["idle"]
                    == 4
                ):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "demo.log").read_text())
        curl = subprocess.run(
            [
                "curl",
                "-sS",
                f"http://127.0.0.1:{base}/v1/chat/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], '
                '"max_tokens": 16}',
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert '"finish_reason":"length"' in curl.stdout
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{base}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=16,
            stream=True,
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        client.close()
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
