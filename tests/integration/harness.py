"""Running paddlerd as a real process in tests, and never leaving anything behind."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from paddler.supervisor.specs import role_of

DEFAULT_TIMEOUT = 60.0


class PaddlerdRunner:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config_path = directory / "paddler.toml"
        self.log_path = directory / "paddlerd.log"
        self.pidfile = directory / "paddlerd.pid"
        self.process: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}

    def write_config(self, text: str) -> None:
        # Every test's paddlerd gets its own pidfile.
        self.config_path.write_text(f'[paddlerd]\npidfile = "{self.pidfile}"\n{text}')

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **(extra_env or {})}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "paddler.supervisor.cli", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(
        self, pattern: str, timeout: float = DEFAULT_TIMEOUT, after: int = 0
    ) -> re.Match[str]:
        """Wait for ``pattern`` in the log, looking only past character ``after``."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while time.monotonic() < deadline:
            match = compiled.search(self.log(), after)
            if match:
                return match
            assert self.process is not None
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in paddlerd's log within {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def children(self) -> dict[str, psutil.Process]:
        """paddlerd's live children by the name their log lines carry."""
        found: dict[str, psutil.Process] = {}
        for child in psutil.Process(self.pid).children():
            self._seen[child.pid] = child
            for descendant in child.children(recursive=True):
                self._seen[descendant.pid] = descendant
            found[_child_name(child)] = child
        return found

    def child_pid(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            child = self.children().get(name)
            if child is not None:
                return child.pid
            time.sleep(0.05)
        raise AssertionError(f"paddlerd has no child {name}")

    def seen_processes(self) -> list[psutil.Process]:
        return list(self._seen.values())

    def kill_everything(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.children()
            self.process.kill()
            self.process.wait(10)
        for process in self._seen.values():
            with contextlib.suppress(psutil.Error):
                process.kill()


def _child_name(process: psutil.Process) -> str:
    """The name paddlerctl shows for a child ("agent.gpu0", "llamacpp :8081")."""
    return role_of(process.cmdline())


def is_gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = processes
    while time.monotonic() < deadline:
        alive = [process for process in alive if not is_gone(process)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def health(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
    except httpx.TransportError:
        return 0


def llamacpp_entry(
    name: str,
    binary: Path,
    model: Path,
    port: int,
    slots: int = 1,
    extra_args: tuple[str, ...] = (),
) -> str:
    # One thread each: llama.cpp's threads spin while they wait, so two servers of two
    # threads on a two-core machine slow each other down by an order of magnitude.
    arguments = json.dumps(["--threads", "1", *extra_args])
    return (
        f'[[llamacpp]]\nname = "{name}"\nbinary = "{binary}"\nmodel = "{model}"\n'
        f"port = {port}\nslots = {slots}\ncontext_size = {256 * slots}\n"
        f"extra_args = {arguments}\n"
    )


def kill(process_id: int) -> None:
    os.kill(process_id, signal.SIGKILL)
