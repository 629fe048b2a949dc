"""paddlerd's own behaviour: systemd notification, the pidfile, configuration errors.

These need no llama.cpp: the children are the placeholder roles or a script.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from paddler.testbed.ports import free_port
from tests.integration.harness import PaddlerdRunner, wait_gone

ROLES = (
    f"[balancer]\nmanagement_port = {free_port()}\nreverseproxy_port = {free_port()}\n"
    "[[agent]]\nlocal_llamacpp_port = 1\n"
)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(20)
        yield sock


def receive_until(sock: socket.socket, field: str) -> list[str]:
    messages: list[str] = []
    while True:
        message = sock.recv(4096).decode()
        messages.append(message)
        if field in message.splitlines():
            return messages


def test_notifies_systemd_ready_watchdog_and_stopping(
    paddlerd: PaddlerdRunner, notify_socket: socket.socket
) -> None:
    paddlerd.write_config(ROLES)
    paddlerd.start({"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "400000"})

    before_ready = receive_until(notify_socket, "READY=1")
    ready = before_ready[-1].splitlines()
    assert "STATUS=2 running" in ready
    assert f"MAINPID={paddlerd.pid}" in ready
    receive_until(notify_socket, "WATCHDOG=1")
    # The children never see paddlerd's notification socket.
    agent = paddlerd.children()["agent"]
    assert "NOTIFY_SOCKET" not in agent.environ()
    # What paddlerctl shows of the children, published beside the pidfile.
    published = json.loads(paddlerd.pidfile.with_suffix(".state").read_text())
    assert published["pid"] == paddlerd.pid
    states = {c["name"]: c["state"] for c in published["children"]}
    assert states == {"agent.0": "running", "balancer": "running"}

    paddlerd.signal(signal.SIGTERM)
    receive_until(notify_socket, "STOPPING=1")
    assert paddlerd.wait_exit(20) == 0
    assert not paddlerd.pidfile.with_suffix(".state").exists()


def test_reload_notifies_reloading_then_ready(
    paddlerd: PaddlerdRunner, notify_socket: socket.socket
) -> None:
    paddlerd.write_config(ROLES)
    paddlerd.start({"NOTIFY_SOCKET": notify_socket.getsockname()})
    receive_until(notify_socket, "READY=1")

    paddlerd.signal(signal.SIGHUP)
    reloading = receive_until(notify_socket, "RELOADING=1")[-1]
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.splitlines())
    receive_until(notify_socket, "READY=1")


def test_child_exiting_with_a_configuration_error_is_fatal_at_once(
    paddlerd: PaddlerdRunner, tmp_path: Path
) -> None:
    script = tmp_path / "exits-78"
    script.write_text("#!/bin/sh\necho 'bad setting' >&2\nexit 78\n")
    script.chmod(0o755)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    paddlerd.write_config(
        f'[[llamacpp]]\nname = "x"\nbinary = "{script}"\nmodel = "{model}"\nport = {free_port()}\n'
    )
    paddlerd.start()

    paddlerd.wait_for_log(
        r"llamacpp\.x: starting -> fatal: exit status 78 \(configuration "
        r"error\) \(its last line: 'bad setting'\); fix the configuration and reload"
    )
    assert "[llamacpp.x] bad setting" in paddlerd.log()
    assert "backoff" not in paddlerd.log()


def test_second_paddlerd_on_the_same_pidfile_refuses_to_start(
    paddlerd: PaddlerdRunner,
) -> None:
    paddlerd.write_config(ROLES)
    paddlerd.start()
    paddlerd.wait_for_log(r"ready: 2 running")

    second = subprocess.run(
        [sys.executable, "-m", "paddler.supervisor.cli", "-c", str(paddlerd.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 75
    assert f"paddlerd is already running (pid {paddlerd.pid}" in second.stderr
    assert paddlerd.pidfile.read_text().strip() == str(paddlerd.pid)

    paddlerd.signal(signal.SIGTERM)
    assert paddlerd.wait_exit(20) == 0
    assert not paddlerd.pidfile.exists()


def test_sighup_adds_and_removes_children(paddlerd: PaddlerdRunner) -> None:
    paddlerd.write_config(ROLES)
    paddlerd.start()
    paddlerd.wait_for_log(r"ready: 2 running")
    agent = paddlerd.children()["agent"]

    paddlerd.write_config(ROLES.split("[[agent]]", maxsplit=1)[0])
    mark = len(paddlerd.log())
    paddlerd.signal(signal.SIGHUP)
    paddlerd.wait_for_log(r"SIGHUP: reloaded .*: stop agent\.0", after=mark)
    paddlerd.wait_for_log(r"agent\.0: stopping -> stopped: exit status 0", after=mark)
    assert wait_gone([agent], 5) == []
    assert "balancer: running -> stopping" not in paddlerd.log()

    paddlerd.write_config(ROLES)
    mark = len(paddlerd.log())
    paddlerd.signal(signal.SIGHUP)
    paddlerd.wait_for_log(r"SIGHUP: reloaded .*: start agent\.0", after=mark)
    paddlerd.wait_for_log(r"agent\.0: starting -> running", after=mark)


def test_second_sigterm_kills_children_that_ignore_the_first(
    paddlerd: PaddlerdRunner, tmp_path: Path
) -> None:
    script = tmp_path / "stubborn"
    script.write_text("#!/bin/sh\ntrap '' TERM\nwhile true; do sleep 0.1; done\n")
    script.chmod(0o755)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    paddlerd.write_config(
        f'[[llamacpp]]\nname = "x"\nbinary = "{script}"\nmodel = "{model}"\nport = {free_port()}\n'
    )
    paddlerd.start()
    paddlerd.wait_for_log(r"llamacpp\.x: stopped -> starting")
    time.sleep(0.5)
    paddlerd.signal(signal.SIGTERM)
    paddlerd.wait_for_log(r"llamacpp\.x: starting -> stopping")
    paddlerd.signal(signal.SIGTERM)
    paddlerd.wait_for_log(r"SIGTERM again while stopping: killing every child now")
    assert paddlerd.wait_exit(10) == 0
