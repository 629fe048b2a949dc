"""paddlerd supervising real llama-server processes."""

import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from paddler.testbed.ports import free_port
from tests.integration.harness import (
    PaddlerdRunner,
    health,
    kill,
    llamacpp_entry,
    wait_gone,
)

pytestmark = pytest.mark.llamacpp

FAST_BACKOFF = "backoff_initial = 0.2\nbackoff_max = 1.0\nstop_timeout = 5.0\n"


def two_instances(binary: Path, model: Path, ports: tuple[int, int], slots_b: int = 1) -> str:
    return llamacpp_entry("a", binary, model, ports[0]) + llamacpp_entry(
        "b", binary, model, ports[1], slots=slots_b
    )


def start_two(paddlerd: PaddlerdRunner, binary: Path, model: Path) -> tuple[int, int]:
    ports = (free_port(), free_port())
    paddlerd.write_config(FAST_BACKOFF + two_instances(binary, model, ports))
    paddlerd.start()
    paddlerd.wait_for_log(r"llamacpp\.a: starting -> running: /health answers 200")
    paddlerd.wait_for_log(r"llamacpp\.b: starting -> running: /health answers 200")
    return ports


def test_supervises_two_llama_servers_and_restarts_a_killed_one(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    ports = start_two(paddlerd, llama_server_binary, tiny_model)
    assert [health(port) for port in ports] == [200, 200]
    first_pid = paddlerd.child_pid(f"llamacpp :{ports[0]}")
    other_pid = paddlerd.child_pid(f"llamacpp :{ports[1]}")

    mark = len(paddlerd.log())
    kill(first_pid)
    paddlerd.wait_for_log(
        r"llamacpp\.a: running -> backoff: killed by SIGKILL.*; restarting in", after=mark
    )
    paddlerd.wait_for_log(r"llamacpp\.a: starting -> running", after=mark)

    assert health(ports[0]) == 200
    assert paddlerd.child_pid(f"llamacpp :{ports[0]}") != first_pid
    assert paddlerd.child_pid(f"llamacpp :{ports[1]}") == other_pid
    # Its log lines reach paddlerd's log under its own name.
    assert "[llamacpp.a] " in paddlerd.log()

    everything = paddlerd.seen_processes()
    paddlerd.signal(signal.SIGTERM)
    assert paddlerd.wait_exit(30) == 0
    assert wait_gone(everything, 5) == []
    assert [health(port) for port in ports] == [0, 0]


def test_sigkill_of_paddlerd_leaves_no_llama_server(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    start_two(paddlerd, llama_server_binary, tiny_model)
    servers = list(paddlerd.children().values())
    assert len(servers) == 2

    paddlerd.signal(signal.SIGKILL)
    paddlerd.wait_exit(5)

    assert wait_gone(servers, 2.0) == []


def test_stops_balancer_then_agents_then_llama_servers(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    port = free_port()
    paddlerd.write_config(
        FAST_BACKOFF
        + f"[balancer]\nmanagement_port = {free_port()}\nreverseproxy_port = {free_port()}\n"
        + f'[[agent]]\nname = "a"\nlocal_llamacpp_port = {port}\n'
        + llamacpp_entry("a", llama_server_binary, tiny_model, port)
    )
    paddlerd.start()
    paddlerd.wait_for_log(r"\[paddlerd\] INFO ready: 3 running")

    paddlerd.signal(signal.SIGTERM)
    assert paddlerd.wait_exit(30) == 0

    log = paddlerd.log()
    order = [
        log.index("balancer: stopping -> stopped"),
        log.index("agent.a: running -> stopping"),
        log.index("agent.a: stopping -> stopped"),
        log.index("llamacpp.a: running -> stopping"),
    ]
    assert order == sorted(order)
    assert log.index("balancer: running -> stopping") < order[0]


def test_child_that_keeps_dying_at_start_becomes_fatal_without_spinning(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    paddlerd.write_config(
        "fatal_after = 4\n"
        + FAST_BACKOFF
        + llamacpp_entry(
            "broken",
            llama_server_binary,
            tiny_model,
            free_port(),
            extra_args=("--no-such-flag",),
        )
    )
    started = time.monotonic()
    paddlerd.start()
    fatal = paddlerd.wait_for_log(
        r"llamacpp\.broken: backoff -> fatal: (.*)|"
        r"llamacpp\.broken: starting -> fatal: (.*)"
    )
    elapsed = time.monotonic() - started
    reason = fatal.group(1) or fatal.group(2)
    # The line says why: the exit, llama-server's own last words, and the count.
    assert "exit status 1 (its last line: 'error: invalid argument: --no-such-flag')" in reason
    assert "failed 4 times in a row" in reason
    assert paddlerd.log().count("llamacpp.broken: starting -> backoff") == 3

    process = psutil.Process(paddlerd.pid)
    busy = process.cpu_times()
    # Backing off means sleeping: paddlerd's own CPU stays a small share of the time.
    assert busy.user + busy.system < 0.5 * elapsed + 0.5
    time.sleep(2.0)
    after = process.cpu_times()
    assert (after.user + after.system) - (busy.user + busy.system) < 0.1
    assert process.is_running()


def test_sighup_restarts_only_the_changed_llama_server(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    ports = start_two(paddlerd, llama_server_binary, tiny_model)
    pid_a = paddlerd.child_pid(f"llamacpp :{ports[0]}")
    pid_b = paddlerd.child_pid(f"llamacpp :{ports[1]}")

    paddlerd.write_config(
        FAST_BACKOFF + two_instances(llama_server_binary, tiny_model, ports, slots_b=2)
    )
    mark = len(paddlerd.log())
    paddlerd.signal(signal.SIGHUP)
    paddlerd.wait_for_log(r"SIGHUP: reloaded .*: restart llamacpp\.b\n", after=mark)
    paddlerd.wait_for_log(r"llamacpp\.b: starting -> running", after=mark)

    assert paddlerd.child_pid(f"llamacpp :{ports[0]}") == pid_a
    assert paddlerd.child_pid(f"llamacpp :{ports[1]}") != pid_b
    props = httpx.get(f"http://127.0.0.1:{ports[1]}/props", timeout=5).json()
    assert props["total_slots"] == 2
    assert "llamacpp.a: running -> stopping" not in paddlerd.log()


def test_sighup_with_a_broken_file_keeps_everything_running(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    ports = start_two(paddlerd, llama_server_binary, tiny_model)
    pids = {name: process.pid for name, process in paddlerd.children().items()}
    text = paddlerd.config_path.read_text()
    paddlerd.config_path.write_text(text.replace("slots = 1", 'slots = "one"', 1))

    mark = len(paddlerd.log())
    paddlerd.signal(signal.SIGHUP)
    error = paddlerd.wait_for_log(
        r"SIGHUP: .* is invalid, so the running configuration "
        r"stays:\n(.*)",
        after=mark,
    )
    assert "llamacpp[0].slots: must be an integer, not the string 'one'" in error.group(1)
    time.sleep(1.0)
    assert {name: process.pid for name, process in paddlerd.children().items()} == pids
    assert [health(port) for port in ports] == [200, 200]
