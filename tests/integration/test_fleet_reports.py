"""Agents report real llama-servers' slots to the balancer's table (paddlerd runs it all)."""

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from paddler.testbed.ports import free_port
from tests.integration.harness import PaddlerdRunner, llamacpp_entry

pytestmark = pytest.mark.llamacpp

TOKEN = "s3cret-token"
INTERVAL = 0.3
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def agents(port: int) -> dict[str, dict[str, Any]]:
    answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/agents", headers=AUTH, timeout=5)
    answer.raise_for_status()
    return {agent["name"]: agent for agent in answer.json()["agents"]}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took for ``condition`` to hold."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def paddlerctl(*arguments: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "paddler.ctl.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def generate(port: int, tokens: int) -> None:
    httpx.post(
        f"http://127.0.0.1:{port}/completion",
        timeout=120,
        json={"prompt": "hello", "n_predict": tokens, "ignore_eos": True},
    )


def test_three_agents_report_three_llama_servers(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path, tmp_path: Path
) -> None:
    management = free_port()
    servers = {"two": (free_port(), 2), "three": (free_port(), 3), "four": (free_port(), 4)}

    def config(without_agent: str = "") -> str:
        text = (
            "backoff_initial = 2.0\n"
            f"[balancer]\nmanagement_port = {management}\nreverseproxy_port = {proxy}\n"
            f'management_token = "{TOKEN}"\nworkers = 2\nslot_table = "{tmp_path}/slots"\n'
        )
        for name, (port, slots) in servers.items():
            if name != without_agent:
                text += (
                    f'[[agent]]\nname = "{name}"\nlocal_llamacpp_port = {port}\n'
                    f'balancers = ["127.0.0.1:{management}"]\nmanagement_token = "{TOKEN}"\n'
                    f"monitoring_interval = {INTERVAL}\n"
                )
            # Long generations need room: 4096 tokens of context per slot.
            text += llamacpp_entry(name, llama_server_binary, tiny_model, port, slots=slots)
        return text.replace("context_size = 1024", "context_size = 16384")

    proxy = free_port()
    paddlerd.write_config(config())
    paddlerd.start()
    paddlerd.wait_for_log(r"ready: 7 running")

    # Every agent is in the table with its server's slot count within two intervals
    # of the fleet being up.
    wait_until(lambda: len(agents(management)) == 3, 2 * INTERVAL + 1, "three agents")
    listed = agents(management)
    assert {name: agent["slots"]["total"] for name, agent in listed.items()} == {
        "two": 2,
        "three": 3,
        "four": 4,
    }
    assert all(agent["in_rotation"] and agent["state"] == "ready" for agent in listed.values())
    assert listed["four"]["address"] == f"127.0.0.1:{servers['four'][0]}"
    assert listed["four"]["model"] == "tiny"  # paddlerd passes the file name as --alias

    # paddlerctl reads the same from the slot table (no token needed on the host)...
    local = paddlerctl("-c", str(paddlerd.config_path), "agents", "--json")
    assert {a["name"]: a["slots"]["total"] for a in json.loads(local)["agents"]} == {
        "two": 2,
        "three": 3,
        "four": 4,
    }
    # ...and from the management API, with the token.
    remote = paddlerctl(
        "agents", "--management", f"http://127.0.0.1:{management}", "--token", TOKEN
    )
    assert remote.splitlines()[0].split() == [
        "name",
        "address",
        "state",
        "busy/total",
        "reserved",
        "age",
        "model",
        "error",
    ]
    assert any(
        line.split()[:4] == ["four", f"127.0.0.1:{servers['four'][0]}", "ready", "0/4"]
        for line in remote.splitlines()
    )

    # Four long requests straight to one server show as its busy slots.
    port_four = servers["four"][0]
    requests = [threading.Thread(target=generate, args=(port_four, 3000)) for _ in range(4)]
    for request in requests:
        request.start()
    wait_until(
        lambda: agents(management)["four"]["slots"]["processing"] == 4, 5, "4 busy slots on 'four'"
    )
    assert agents(management)["four"]["slots"]["free"] == 0
    for request in requests:
        request.join()
    wait_until(
        lambda: agents(management)["four"]["slots"]["processing"] == 0, 5, "the slots free again"
    )

    # An agent that dies stops reporting: its upstream leaves rotation within three
    # intervals, and comes back when paddlerd has restarted the agent.
    paddlerd.children()["agent.three"].send_signal(signal.SIGKILL)
    left = wait_until(
        lambda: not agents(management)["three"]["in_rotation"], 5, "'three' out of rotation"
    )
    assert left <= 3 * INTERVAL + 0.5
    assert agents(management)["three"]["state"] == "stale"
    paddlerd.wait_for_log(r"agent\.three: backoff -> starting")
    wait_until(lambda: agents(management)["three"]["in_rotation"], 10, "'three' back")
    assert len(agents(management)) == 3  # the new agent took the old row over

    # An agent that stops cleanly (here: removed from the file, then SIGHUP) tells the
    # balancer, which drops its upstream at once instead of after missed reports.
    paddlerd.write_config(config(without_agent="two"))
    paddlerd.signal(signal.SIGHUP)
    paddlerd.wait_for_log(r"agent\.two: stopping -> stopped: exit status 0")
    assert "two" not in agents(management)


def test_reports_without_the_token_or_malformed_change_nothing(
    paddlerd: PaddlerdRunner, tmp_path: Path
) -> None:
    management = free_port()
    paddlerd.write_config(
        f"[balancer]\nmanagement_port = {management}\nreverseproxy_port = {free_port()}\n"
        f'management_token = "{TOKEN}"\nworkers = 1\nslot_table = "{tmp_path}/slots.table"\n'
    )
    paddlerd.start()
    paddlerd.wait_for_log(r"ready: 1 running")
    url = f"http://127.0.0.1:{management}/api/v1/agents/abc"
    report = {
        "sequence": 1,
        "interval": 1.0,
        "name": "x",
        "upstream": {"host": "127.0.0.1", "port": 9},
        "state": "ready",
        "slots": {"total": 2, "idle": 2, "processing": 0},
        "model": "m",
        "build": "b",
        "error": "",
    }

    refused = httpx.put(url, json=report, timeout=5)
    assert refused.status_code == 401
    wrong = httpx.put(url, json=report, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 401
    assert httpx.get(f"http://127.0.0.1:{management}/api/v1/agents", timeout=5).status_code == (401)
    assert agents(management) == {}
    paddlerd.wait_for_log(
        r"refused PUT /api/v1/agents/abc from 127\.0\.0\.1: missing or "
        r"wrong bearer token"
    )

    garbage = httpx.put(url, content=b'{"sequence": 1,', headers=AUTH, timeout=5)
    assert garbage.status_code == 400
    assert garbage.json()["error"].startswith("the report is not valid JSON: ")
    bad_field = httpx.put(
        url,
        json={**report, "slots": {"total": 2, "idle": "2", "processing": 0}},
        headers=AUTH,
        timeout=5,
    )
    assert bad_field.status_code == 400
    assert bad_field.json() == {
        "error": "field 'slots.idle' must be a whole number from 0 to 65535"
    }
    huge = httpx.put(url, json={**report, "error": "x" * 70000}, headers=AUTH, timeout=5)
    assert huge.status_code == 413
    assert huge.json() == {"error": "the report is larger than 65536 bytes"}
    assert agents(management) == {}

    accepted = httpx.put(url, json=report, headers=AUTH, timeout=5)
    assert accepted.json() == {"accepted": True, "applied": "new"}
    assert list(agents(management)) == ["x"]
    # The health endpoint needs no token: load balancers and systemd probe it.
    health = httpx.get(f"http://127.0.0.1:{management}/health", timeout=5)
    assert health.json() == {"status": "ok"}
