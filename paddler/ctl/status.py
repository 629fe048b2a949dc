"""paddlerctl status: the fleet and this host's processes, live or as one frame.

A pure snapshot -> renderable function (rich's top_lite_simulator example) fed by
a thin Live loop, so that what the screen shows is testable as text.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from paddler.config import Config
from paddler.config.model import slot_table_path
from paddler.slots import SlotTable, SlotTableError
from paddler.slots.view import describe
from paddler.supervisor.pidfile import read_pid
from paddler.supervisor.specs import role_of

BAR_WIDTH = 10


@dataclass
class ProcessInfo:
    role: str
    pid: int
    cpu_percent: float
    rss_mb: float


@dataclass
class Snapshot:
    upstreams: list[dict[str, Any]] = field(default_factory=list)
    queued: int = 0
    processes: list[ProcessInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def collect(config: Config) -> Snapshot:
    snapshot = Snapshot()
    if config.balancer is not None:
        try:
            table = SlotTable.open(Path(slot_table_path(config.balancer)), readonly=True)
        except SlotTableError as error:
            snapshot.problems.append(str(error))
        else:
            try:
                now = time.monotonic()
                snapshot.upstreams = sorted(
                    (describe(row, now, config.balancer.missed_reports) for row in table.rows()),
                    key=lambda upstream: str(upstream["name"]),
                )
                snapshot.queued = table.waiting()
            finally:
                table.close()
    snapshot.processes, problem = _processes(Path(config.paddlerd.pidfile))
    if problem:
        snapshot.problems.append(problem)
    return snapshot


def _processes(pidfile: Path) -> tuple[list[ProcessInfo], str]:
    pid = read_pid(pidfile)
    if pid is None:
        return [], f"paddlerd is not running (no pid in {pidfile})"
    try:
        paddlerd = psutil.Process(pid)
        found = [_info("paddlerd", paddlerd)]
        for child in paddlerd.children():
            found.append(_info(_role(child), child))
            found += [
                _info(f"  {_role(child)} worker", grandchild)
                for grandchild in child.children(recursive=True)
            ]
    except psutil.Error as error:
        return [], f"cannot look at paddlerd (pid {pid}): {error}"
    return found, ""


def _role(process: psutil.Process) -> str:
    return role_of(process.cmdline())


# psutil measures CPU between two looks at the same Process object: keep them.
_SEEN: dict[int, psutil.Process] = {}


def _info(role: str, process: psutil.Process) -> ProcessInfo:
    known = _SEEN.get(process.pid)
    if known is None or known.create_time() != process.create_time():
        _SEEN[process.pid] = known = process
    with known.oneshot():
        return ProcessInfo(
            role, known.pid, known.cpu_percent(interval=None), known.memory_info().rss / 2**20
        )


def _bar(busy: int, total: int) -> Text:
    filled = round(BAR_WIDTH * busy / total) if total else 0
    bar = Text("█" * filled, style="red" if busy >= total > 0 else "yellow")
    bar.append("░" * (BAR_WIDTH - filled), style="dim")
    bar.append(f" {busy}/{total}")
    return bar


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
        "error",
    ):
        upstreams.add_column(column)
    for upstream in snapshot.upstreams:
        slots = upstream["slots"]
        upstreams.add_row(
            upstream["name"],
            upstream["address"],
            upstream["model"],
            upstream["state"],
            _bar(slots["total"] - slots["free"], slots["total"]),
            str(upstream["reservations"]),
            f"{upstream['last_report_age']:.1f}s ago",
            upstream["error"],
        )
    total = sum(u["slots"]["total"] for u in snapshot.upstreams if u["in_rotation"])
    free = sum(u["slots"]["free"] for u in snapshot.upstreams if u["in_rotation"])
    fleet = Text(f"Fleet: {total - free}/{total} slots busy, {snapshot.queued} queued")
    processes = Table(title="This host's processes", expand=False)
    for column in ("role", "pid", "cpu %", "memory"):
        processes.add_column(column)
    for info in snapshot.processes:
        processes.add_row(
            info.role, str(info.pid), f"{info.cpu_percent:.0f}", f"{info.rss_mb:.0f} MB"
        )
    parts: list[Any] = [fleet, upstreams, processes]
    parts += [Text(problem, style="bold red") for problem in snapshot.problems]
    return Group(*parts)


def run(config: Config, once: bool, as_json: bool) -> int:
    if as_json:
        json.dump(asdict(collect(config)), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = Console()
    collect(config)  # psutil's CPU percentages need a first look to compare with
    time.sleep(0.2)
    if once:
        console.print(render(collect(config)))
        return 0
    try:
        with Live(render(collect(config)), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(1)
                live.update(render(collect(config)))
    except KeyboardInterrupt:
        return 0
