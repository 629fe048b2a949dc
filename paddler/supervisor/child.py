"""One supervised child and the state machine that every change to it goes through."""

import enum
import logging
import os
import signal
from dataclasses import dataclass, field

from paddler.supervisor.specs import ChildSpec

log = logging.getLogger("paddlerd")

EX_CONFIG = 78


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FATAL = "fatal"


# Without a health check a child counts as running once it stayed up this long.
UNCHECKED_READY_AFTER = 1.0


@dataclass
class Child:
    spec: ChildSpec
    state: State = State.STOPPED
    pid: int | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    failures: int = 0
    restarts: int = 0
    next_start_at: float = 0.0
    stop_deadline: float = 0.0
    next_probe_at: float = 0.0
    kill_sent: bool = False
    # What to do once a stop completes: start again (a changed spec) or forget it.
    replacement: ChildSpec | None = None
    remove_when_stopped: bool = False
    last_exit: str = ""
    history: list[State] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def change_state(self, new: State, reason: str = "") -> None:
        """The one place a child changes state, so that every change is logged."""
        if new is self.state:
            return
        level = logging.ERROR if new is State.FATAL else logging.INFO
        suffix = f": {reason}" if reason else ""
        log.log(level, "%s: %s -> %s%s", self.name, self.state.value, new.value, suffix)
        self.state = new
        self.history.append(new)

    def signal_group(self, signum: int) -> None:
        """Signal the child's whole process group: it and whatever it forked."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, signum)


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"killed by {name}"
    code = os.waitstatus_to_exitcode(status)
    if code == EX_CONFIG:
        return "exit status 78 (configuration error)"
    if code == 127:
        return "exit status 127 (could not be executed)"
    return f"exit status {code}"


def is_config_error(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == EX_CONFIG
