"""paddlerctl status: the fleet and this host's processes, live or as one frame.

A pure snapshot -> renderable function (rich's top_lite_simulator example) fed by
a thin Live loop, so that what the screen shows is testable as text. On the balancer
host it reads the slot table and the counter files (without their locks: it can never
slow the balancer) and paddlerd's pidfile and published child states; from elsewhere
(--management URL) it asks the management API and /metrics.
"""

import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from paddler.config import Config
from paddler.config.model import counters_directory, slot_table_path
from paddler.metrics.counters import read_all
from paddler.metrics.traffic import Totals, Traffic, parse_exposition, totals, traffic
from paddler.slots import SlotTable, SlotTableError
from paddler.slots.view import describe
from paddler.supervisor.pidfile import read_pid
from paddler.supervisor.published import read_published
from paddler.supervisor.specs import role_of

BAR_WIDTH = 10
WINDOW = 60.0  # seconds of readings that rates and latencies are taken over, at most


@dataclass
class ProcessInfo:
    role: str
    pid: int
    cpu_percent: float
    rss_mb: float
    state: str = ""  # paddlerd's word for its children; "" for the others
    restarts: int | None = None


@dataclass
class Snapshot:
    upstreams: list[dict[str, Any]] = field(default_factory=list)
    queued: int = 0
    oldest_wait: float = 0.0
    traffic: Traffic | None = None
    processes: list[ProcessInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Collector:
    """Takes snapshots, keeping the counter readings of the last WINDOW seconds."""

    def __init__(
        self, config: Config | None, management: str | None = None, token: str | None = None
    ) -> None:
        self.config = config
        self.management = management.rstrip("/") if management else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.readings: deque[Totals] = deque()

    def collect(self) -> Snapshot:
        snapshot = Snapshot()
        try:
            reading = self._remote(snapshot) if self.management else self._local(snapshot)
        except (SlotTableError, OSError, httpx.HTTPError, ValueError, KeyError) as error:
            snapshot.problems.append(str(error) or repr(error))
            reading = None
        if reading is not None:
            while self.readings and reading.at - self.readings[0].at > WINDOW:
                self.readings.popleft()
            if self.readings:
                snapshot.traffic = traffic(self.readings[0], reading)
            self.readings.append(reading)
        if self.config is not None and not self.management:
            snapshot.processes, problem = _processes(Path(self.config.paddlerd.pidfile))
            if problem:
                snapshot.problems.append(problem)
        return snapshot

    def _local(self, snapshot: Snapshot) -> Totals | None:
        assert self.config is not None
        balancer = self.config.balancer
        if balancer is None:
            return None
        table = SlotTable.open(Path(slot_table_path(balancer)), readonly=True)
        try:
            now = time.monotonic()
            snapshot.upstreams = sorted(
                (describe(row, now, balancer.missed_reports) for row in table.rows()),
                key=lambda upstream: str(upstream["name"]),
            )
            snapshot.queued = table.waiting()
            snapshot.oldest_wait = table.oldest_wait(now)
        finally:
            table.close()
        samples = read_all(Path(counters_directory(balancer)))
        return totals(samples, time.monotonic(), cumulative=False)

    def _remote(self, snapshot: Snapshot) -> Totals:
        base = self.management
        agents = httpx.get(f"{base}/api/v1/agents", headers=self.headers, timeout=10)
        if agents.status_code == 401:
            raise PermissionError("the management API refused the token (401); pass --token")
        agents.raise_for_status()
        snapshot.upstreams = sorted(agents.json()["agents"], key=lambda u: str(u["name"]))
        metrics = httpx.get(f"{base}/metrics", timeout=10)
        metrics.raise_for_status()
        samples = parse_exposition(metrics.text)
        snapshot.queued = int(samples.get("paddler_queue_depth", 0))
        snapshot.oldest_wait = samples.get("paddler_queue_oldest_wait_seconds", 0.0)
        return totals(samples, time.monotonic(), cumulative=True)


def _processes(pidfile: Path) -> tuple[list[ProcessInfo], str]:
    pid = read_pid(pidfile)
    if pid is None:
        return [], f"paddlerd is not running (no pid in {pidfile})"
    entries = read_published(pidfile)
    published = {int(entry["pid"]): entry for entry in entries if entry.get("pid")}
    try:
        paddlerd = psutil.Process(pid)
        found = [_info("paddlerd", paddlerd, "running")]
        for child in paddlerd.children():
            entry = published.get(child.pid, {})
            found.append(
                _info(
                    str(entry.get("name") or _role(child)),
                    child,
                    str(entry.get("state", "")),
                    entry.get("restarts"),
                )
            )
            found += [
                _info(f"  {_role(child)} worker", grandchild)
                for grandchild in child.children(recursive=True)
            ]
    except psutil.Error as error:
        return [], f"cannot look at paddlerd (pid {pid}): {error}"
    # Children that paddlerd knows but that have no process now (backing off, fatal).
    running = {info.pid for info in found}
    for entry in entries:
        if entry.get("pid") not in running:
            found.append(ProcessInfo(entry["name"], 0, 0.0, 0.0, entry["state"], entry["restarts"]))
    return found, ""


def _role(process: psutil.Process) -> str:
    return role_of(process.cmdline())


# psutil measures CPU between two looks at the same Process object: keep them.
_SEEN: dict[int, psutil.Process] = {}


def _info(
    role: str, process: psutil.Process, state: str = "", restarts: int | None = None
) -> ProcessInfo:
    known = _SEEN.get(process.pid)
    if known is None or known.create_time() != process.create_time():
        _SEEN[process.pid] = known = process
    with known.oneshot():
        return ProcessInfo(
            role,
            known.pid,
            known.cpu_percent(interval=None),
            known.memory_info().rss / 2**20,
            state,
            restarts,
        )


def _bar(busy: int, total: int) -> Text:
    filled = round(BAR_WIDTH * busy / total) if total else 0
    bar = Text("█" * filled, style="red" if busy >= total > 0 else "yellow")
    bar.append("░" * (BAR_WIDTH - filled), style="dim")
    bar.append(f" {busy}/{total}")
    return bar


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _fleet_line(snapshot: Snapshot) -> Text:
    total = sum(u["slots"]["total"] for u in snapshot.upstreams if u["in_rotation"])
    free = sum(u["slots"]["free"] for u in snapshot.upstreams if u["in_rotation"])
    line = f"Fleet: {total - free}/{total} slots busy, {snapshot.queued} queued"
    if snapshot.queued:
        line += f" (oldest {snapshot.oldest_wait:.1f}s)"
    flow = snapshot.traffic
    if flow is not None:
        line += (
            f" · {flow.requests_per_second:.1f} req/s, {flow.errors_per_second:.1f} 5xx/s,"
            f" p50 {_milliseconds(flow.p50_ms)}, p99 {_milliseconds(flow.p99_ms)}"
        )
        if flow.cache_share is not None:
            line += f", {flow.cache_share:.0%} of prompt tokens from cache"
        line += f" (last {flow.window:g}s)"
    return Text(line)


def render(snapshot: Snapshot) -> Group:
    upstreams = Table(title="Upstreams", expand=False)
    for column in (
        "name",
        "address",
        "model",
        "state",
        "slots busy",
        "reserved",
        "report",
        "from cache",
        "llama.cpp",
        "error",
    ):
        upstreams.add_column(column)
    shares = snapshot.traffic.upstream_cache_share if snapshot.traffic else {}
    for upstream in snapshot.upstreams:
        slots = upstream["slots"]
        share = shares.get(upstream["name"])
        upstreams.add_row(
            upstream["name"],
            upstream["address"],
            upstream["model"],
            upstream["state"],
            _bar(slots["total"] - slots["free"], slots["total"]),
            str(upstream["reservations"]),
            f"{upstream['last_report_age']:.1f}s ago",
            "-" if share is None else f"{share:.0%}",
            str(upstream.get("build", "")),
            upstream["error"],
        )
    parts: list[Any] = [_fleet_line(snapshot), upstreams]
    if snapshot.processes:
        processes = Table(title="This host's processes", expand=False)
        for column in ("role", "pid", "state", "restarts", "cpu %", "memory"):
            processes.add_column(column)
        for info in snapshot.processes:
            processes.add_row(
                info.role,
                str(info.pid) if info.pid else "-",
                info.state,
                "" if info.restarts is None else str(info.restarts),
                f"{info.cpu_percent:.0f}",
                f"{info.rss_mb:.0f} MB" if info.pid else "-",
            )
        parts.append(processes)
    parts += [Text(problem, style="bold red") for problem in snapshot.problems]
    return Group(*parts)


def run(collector: Collector, once: bool, as_json: bool) -> int:
    # The first look: psutil's CPU percentages and the rates need one to compare with.
    collector.collect()
    time.sleep(1.0)
    if as_json:
        json.dump(asdict(collector.collect()), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = Console()
    if once:
        console.print(render(collector.collect()))
        return 0
    try:
        with Live(render(collector.collect()), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(1)
                live.update(render(collector.collect()))
    except KeyboardInterrupt:
        return 0
