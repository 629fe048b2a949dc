"""Forking a child into its own process group, tied to paddlerd's life.

Every child gets PR_SET_PDEATHSIG=SIGKILL, so that the kernel kills it when
paddlerd dies, even by SIGKILL, and its own process group, so that paddlerd can
signal it together with anything it forks and a terminal's Ctrl-C reaches only
paddlerd, which then stops the children in order.
"""

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass

from paddler.supervisor.specs import ChildSpec

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Spawned:
    pid: int
    output_fd: int  # read end of the pipe that carries the child's stdout and stderr


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(spec: ChildSpec) -> Spawned:
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which execs or exits
        _exec_child(spec, parent, write_fd)
    os.close(write_fd)
    # Set the group from both sides: whichever runs first wins the race that
    # would otherwise let paddlerd signal a group that does not exist yet.
    with contextlib.suppress(OSError):  # EACCES after exec, ESRCH after exit: it did it
        os.setpgid(pid, pid)
    os.set_blocking(read_fd, False)
    return Spawned(pid, read_fd)


def _exec_child(spec: ChildSpec, parent: int, write_fd: int) -> None:  # pragma: no cover
    try:
        os.setpgid(0, 0)
        die_with_parent()
        if os.getppid() != parent:
            os._exit(1)  # paddlerd died before the death signal was armed
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        signal.set_wakeup_fd(-1)
        for signum in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGCHLD,
            signal.SIGPIPE,
            signal.SIGXFSZ,
        ):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execve(spec.argv[0], list(spec.argv), dict(spec.env))
    except BaseException as error:
        os.write(2, f"cannot start {spec.argv[0]}: {error}\n".encode())
    finally:
        os._exit(127)
