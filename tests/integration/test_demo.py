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
from tests.integration.test_dashboard import chromium

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

        # The operator's views of the demo fleet: paddlerctl status and the dashboard.
        config = tmp_path / "demo" / "paddler.toml"
        status = subprocess.run(
            [sys.executable, "-m", "paddler.ctl.cli", "-c", str(config), "status", "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**env, "COLUMNS": "160"},
        )
        assert status.returncode == 0, status.stderr
        for name in ("demo-a", "demo-b"):
            row = next(line for line in status.stdout.splitlines() if f"│ {name} " in line)
            assert "ready" in row
            assert "0/2" in row
        assert "Fleet: 0/4 slots busy, 0 queued" in status.stdout
        page = chromium(
            tmp_path / "profile", "--dump-dom", f"http://127.0.0.1:{base + 5}/dashboard"
        )
        assert page.returncode == 0, page.stderr[-2000:]
        assert '<b id="slots">0/4</b>' in page.stdout
        for name in ("demo-a", "demo-b"):
            assert f"<td>{name}</td>" in page.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
