"""paddlerd's event loop: one thread, one reaper, signals recorded and handled in turn."""

import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from paddler.config import Config, ConfigError, load_config
from paddler.supervisor.backoff import restart_delay
from paddler.supervisor.child import (
    UNCHECKED_READY_AFTER,
    Child,
    State,
    describe_exit,
    is_config_error,
)
from paddler.supervisor.output import LinePrefixer
from paddler.supervisor.probe import HealthProbe
from paddler.supervisor.published import Publisher
from paddler.supervisor.sdnotify import Notifier
from paddler.supervisor.spawn import spawn
from paddler.supervisor.specs import STOP_ORDER, ChildSpec, child_specs

log = logging.getLogger("paddlerd")

PROBE_INTERVAL = 0.25
PROBE_TIMEOUT = 2.0
LONGEST_SLEEP = 1.0


class Supervisor:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        notifier: Notifier,
        clock: Callable[[], float] = time.monotonic,
        state_file: Path | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = notifier
        self.clock = clock
        self.children: dict[str, Child] = {}
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.stop_phases: list[str] | None = None
        self.finished = False
        self.ready_sent = False
        self.next_watchdog = 0.0
        self._outputs: dict[str, LinePrefixer] = {}
        self._probes: dict[str, HealthProbe] = {}
        self._timestamps = "JOURNAL_STREAM" not in os.environ
        self._wakeup_reader: socket.socket | None = None
        self._publisher = Publisher(state_file)

    # -- signals ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup_reader = reader
        self._wakeup_writer = writer
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)
        self.selector.register(reader, selectors.EVENT_READ, ("wakeup", None))

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        # Record only: everything a signal causes happens in the loop, in order.
        self.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.stop_phases is None:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    self.begin_shutdown()
                else:
                    log.warning(
                        "%s again while stopping: killing every child now",
                        signal.Signals(signum).name,
                    )
                    for child in self.children.values():
                        child.signal_group(signal.SIGKILL)
            elif signum == signal.SIGHUP and self.stop_phases is None:
                self.reload()

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()
        for spec in child_specs(self.config).values():
            self._add(spec)
        log.info("supervising %d children from %s", len(self.children), self.config_path)
        while not self.finished:
            self._handle_signals()
            self._reap()
            self._tick(self.clock())
            if self.finished:
                break
            self._publisher.publish(self.published())
            self._poll(self._sleep_time(self.clock()))
        for prefixer in self._outputs.values():
            prefixer.close()
        self._publisher.remove()
        log.info("stopped")
        return 0

    def published(self) -> list[dict[str, object]]:
        """What paddlerctl shows of each child (paddler/supervisor/published.py)."""
        return [
            {
                "name": child.name,
                "state": child.state.value,
                "pid": child.pid,
                "restarts": child.restarts,
                "last_exit": child.last_exit,
            }
            for child in self.children.values()
        ]

    def _poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            kind, item = key.data
            if kind == "wakeup":
                self._drain_wakeup()
            elif kind == "output":
                self._read_output(item)
            elif kind == "probe":
                self._step_probe(item)

    def _drain_wakeup(self) -> None:
        assert self._wakeup_reader is not None
        try:
            while self._wakeup_reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _sleep_time(self, now: float) -> float:
        if self.signals:
            return 0.0
        deadlines = [now + LONGEST_SLEEP]
        for child in self.children.values():
            if child.state is State.STARTING:
                deadlines.append(child.started_at + child.spec.startup_timeout)
                if child.spec.health is None:
                    deadlines.append(child.started_at + UNCHECKED_READY_AFTER)
                elif child.name not in self._probes:
                    deadlines.append(child.next_probe_at)
            elif child.state is State.BACKOFF:
                deadlines.append(child.next_start_at)
            elif child.state is State.STOPPING and not child.kill_sent:
                deadlines.append(child.stop_deadline)
        deadlines.extend(probe.deadline for probe in self._probes.values())
        if self.notifier.watchdog_interval:
            deadlines.append(self.next_watchdog)
        return max(0.0, min(deadlines) - now)

    # -- children --------------------------------------------------------------------------

    def _add(self, spec: ChildSpec) -> None:
        child = Child(spec)
        self.children[spec.name] = child
        self._start(child, self.clock())

    def _start(self, child: Child, now: float) -> None:
        try:
            spawned = spawn(child.spec)
        except OSError as error:
            child.failures += 1
            self._back_off(child, now, f"cannot fork: {error}")
            return
        if child.history:
            child.restarts += 1
        child.pid = spawned.pid
        child.started_at = now
        child.ready_at = None
        child.kill_sent = False
        child.next_probe_at = now + 0.1
        previous = self._outputs.get(child.name)
        if previous is not None and not previous.closed:
            # A grandchild may still hold the old pipe open; stop listening to it.
            self.selector.unregister(previous.fd)
            previous.close()
        prefixer = LinePrefixer(child.name, spawned.output_fd, timestamps=self._timestamps)
        self._outputs[child.name] = prefixer
        self.selector.register(spawned.output_fd, selectors.EVENT_READ, ("output", prefixer))
        child.change_state(State.STARTING, f"pid {spawned.pid}")

    def _stop(self, child: Child, now: float, reason: str) -> None:
        if child.alive:
            if child.state is not State.STOPPING:
                child.signal_group(signal.SIGTERM)
                child.stop_deadline = now + self.config.paddlerd.stop_timeout
                child.kill_sent = False
                child.change_state(State.STOPPING, reason)
            return
        child.change_state(State.STOPPED, reason)
        self._after_stop(child, now)

    def _after_stop(self, child: Child, now: float) -> None:
        if child.remove_when_stopped:
            del self.children[child.name]
        elif child.replacement is not None and self.stop_phases is None:
            child.spec, child.replacement = child.replacement, None
            child.failures = 0
            self._start(child, now)

    def _mark_ready(self, child: Child, now: float, how: str) -> None:
        child.ready_at = now
        child.change_state(State.RUNNING, how)

    def _back_off(self, child: Child, now: float, reason: str) -> None:
        settings = self.config.paddlerd
        delay = restart_delay(
            max(1, child.failures), settings.backoff_initial, settings.backoff_max
        )
        child.next_start_at = now + delay
        child.change_state(State.BACKOFF, f"{reason}; restarting in {delay:.1f}s")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children.values() if c.pid == pid), None)
            if child is not None:
                self._on_exit(child, status, self.clock())

    def _on_exit(self, child: Child, status: int, now: float) -> None:
        assert child.pid is not None
        # Whatever the child forked dies with it: nothing may outlive its supervisor.
        child.signal_group(signal.SIGKILL)
        child.pid = None
        child.last_exit = describe_exit(status)
        self._close_probe(child.name)
        prefixer = self._outputs.get(child.name)
        if prefixer is not None and not prefixer.closed:
            self._read_output(prefixer)  # its last words before the news of its death
        if child.state is State.STOPPING or self.stop_phases is not None:
            child.change_state(State.STOPPED, child.last_exit)
            self._after_stop(child, now)
            return
        if prefixer is not None and prefixer.last_line:
            # An unexpected exit: its last line usually says why.
            child.last_exit += f" (its last line: {prefixer.last_line[:200]!r})"
        settings = self.config.paddlerd
        quick = child.ready_at is None or now - child.ready_at < settings.min_uptime
        child.failures = child.failures + 1 if quick else 0
        if is_config_error(status):
            child.change_state(
                State.FATAL,
                f"{child.last_exit}; fix the configuration and "
                "reload (paddlerctl reload, or SIGHUP to paddlerd)",
            )
        elif child.failures >= settings.fatal_after:
            child.change_state(
                State.FATAL,
                f"{child.last_exit}; it failed {child.failures} times in a row without staying "
                f"up {settings.min_uptime:g}s, so paddlerd gives up on it until the next reload",
            )
        else:
            self._back_off(child, now, child.last_exit)

    def _tick(self, now: float) -> None:
        for name, probe in list(self._probes.items()):
            if now >= probe.deadline:
                self._close_probe(name)
                self.children[name].next_probe_at = now + PROBE_INTERVAL
        for child in list(self.children.values()):
            if child.state is State.STARTING:
                self._tick_starting(child, now)
            elif child.state is State.BACKOFF and now >= child.next_start_at:
                self._start(child, now)
            elif (
                child.state is State.STOPPING and not child.kill_sent and now >= child.stop_deadline
            ):
                log.warning(
                    "%s: still running %gs after SIGTERM; sending SIGKILL",
                    child.name,
                    self.config.paddlerd.stop_timeout,
                )
                child.signal_group(signal.SIGKILL)
                child.kill_sent = True
        if self.stop_phases is not None:
            self._advance_shutdown(now)
        elif not self.ready_sent and all(
            child.state in (State.RUNNING, State.FATAL) for child in self.children.values()
        ):
            self.ready_sent = True
            degraded = any(child.state is State.FATAL for child in self.children.values())
            log.log(
                logging.WARNING if degraded else logging.INFO,
                "ready%s: %s",
                " but degraded" if degraded else "",
                self.summary(),
            )
            self.notifier.ready(self.summary())
        if self.notifier.watchdog_interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval

    def _tick_starting(self, child: Child, now: float) -> None:
        if now - child.started_at > child.spec.startup_timeout:
            if not child.kill_sent:
                log.error(
                    "%s: not ready after %gs; killing it", child.name, child.spec.startup_timeout
                )
                child.signal_group(signal.SIGKILL)
                child.kill_sent = True
            return
        if child.spec.health is None:
            if now - child.started_at >= UNCHECKED_READY_AFTER:
                self._mark_ready(child, now, f"up for {UNCHECKED_READY_AFTER:g}s")
        elif child.name not in self._probes and now >= child.next_probe_at:
            probe = HealthProbe(child.spec.health, now + PROBE_TIMEOUT)
            if probe.failed:
                probe.close()
                child.next_probe_at = now + PROBE_INTERVAL
                return
            self._probes[child.name] = probe
            self.selector.register(probe.sock, probe.events, ("probe", child.name))

    # -- probes and output -----------------------------------------------------------------

    def _step_probe(self, name: str) -> None:
        probe = self._probes[name]
        result = probe.step()
        if result is None:
            self.selector.modify(probe.sock, probe.events, ("probe", name))
            return
        self._close_probe(name)
        child = self.children[name]
        now = self.clock()
        if result and child.state is State.STARTING:
            health = child.spec.health
            assert health is not None
            self._mark_ready(child, now, f"{health.path} answers 200")
        else:
            child.next_probe_at = now + PROBE_INTERVAL

    def _close_probe(self, name: str) -> None:
        probe = self._probes.pop(name, None)
        if probe is not None:
            self.selector.unregister(probe.sock)
            probe.close()

    def _read_output(self, prefixer: LinePrefixer) -> None:
        if not prefixer.read():
            self.selector.unregister(prefixer.fd)
            prefixer.close()

    # -- shutdown and reload ---------------------------------------------------------------

    def begin_shutdown(self) -> None:
        self.notifier.stopping()
        self.stop_phases = list(STOP_ORDER)
        now = self.clock()
        for child in self.children.values():
            if child.state is State.BACKOFF:
                child.change_state(State.STOPPED, "stopping")
        self._advance_shutdown(now)

    def _advance_shutdown(self, now: float) -> None:
        assert self.stop_phases is not None
        while self.stop_phases:
            role = self.stop_phases[0]
            members = [c for c in self.children.values() if c.spec.role == role and c.alive]
            if members:
                for child in members:
                    self._stop(child, now, "paddlerd is stopping")
                return
            self.stop_phases.pop(0)
        self.finished = not any(child.alive for child in self.children.values())

    def reload(self) -> None:
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            log.error(
                "SIGHUP: %s is invalid, so the running configuration stays:\n%s",
                self.config_path,
                error.render(),
            )
            self.notifier.status(f"reload failed: {self.config_path} is invalid")
            return
        self.notifier.reloading()
        if config.paddlerd.pidfile != self.config.paddlerd.pidfile:
            log.warning("paddlerd.pidfile changed; it takes effect at the next start")
        self.config = config
        apply_log_level(config.paddlerd.log_level)
        now = self.clock()
        specs = child_specs(config)
        changes: list[str] = []
        for name, child in list(self.children.items()):
            if name not in specs:
                child.replacement = None
                child.remove_when_stopped = True
                changes.append(f"stop {name}")
                self._stop(child, now, "removed from the configuration")
        for name, spec in specs.items():
            existing = self.children.get(name)
            if existing is None:
                changes.append(f"start {name}")
                self._add(spec)
                continue
            child = existing
            if child.remove_when_stopped or child.spec != spec:
                child.remove_when_stopped = False
                changes.append(f"restart {name}")
                if child.alive:
                    child.replacement = spec
                    self._stop(child, now, "its configuration changed")
                else:
                    child.spec, child.failures = spec, 0
                    self._start(child, now)
            elif child.state is State.FATAL:
                changes.append(f"retry {name}")
                child.failures = 0
                self._start(child, now)
        log.info(
            "SIGHUP: reloaded %s: %s",
            self.config_path,
            ", ".join(changes) if changes else "nothing changed",
        )
        self.notifier.ready(self.summary())

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for child in self.children.values():
            counts[child.state.value] = counts.get(child.state.value, 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no children"


def apply_log_level(level: str) -> None:
    log.setLevel(level.upper())
