"""Scale: a thousand agents reporting every second, and choosing among a thousand upstreams.

    python bench/scale.py              # 1,000 agents, 20 s of reports, 3 repetitions
    python bench/scale.py --smoke      # 1,000 agents, 5 s, once

Two figures, each against a baseline measured in the same run, each the median of the
repetitions with their spread (this machine's speed drifts by tens of percent within
an hour, and both figures sit near their targets):

- The balancer (2 workers, as in production) takes reports from simulated agents at
  one report per agent per second, spread evenly over the second; the CPU time of all
  its processes over the measured seconds, as a share of one core, against the same
  balancer idle for as long. The simulated agents run in their own process (their CPU
  is not counted), over kept-alive connections like real agents.
- In-process, the time to choose and reserve an upstream (``SlotTable.acquire``)
  among 1,000 against among 1, and the release after it.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy_overhead import (  # noqa: E402
    balancer_argv,
    cpu_seconds,
    process,
    stop_cleanly_on_sigterm,
    tree,
    wait_http,
)

from paddler.balancer.proxy.connections import ConnectionPool  # noqa: E402
from paddler.llamacpp.client import UpstreamStatus  # noqa: E402
from paddler.reports import build_report  # noqa: E402
from paddler.slots import SlotTable, UpstreamReport, UpstreamState  # noqa: E402
from paddler.slots.policy import Policy  # noqa: E402
from paddler.testbed.ports import free_port  # noqa: E402


async def report_forever(management: int, agents: int, seconds: float) -> dict[str, Any]:
    """Every agent reports once a second, the agents spread evenly over the second."""
    pool = ConnectionPool(connect_timeout=5.0, keepalive_timeout=30.0)
    address = f"127.0.0.1:{management}"
    status = UpstreamStatus(
        UpstreamState.READY, slots_total=4, slots_idle=4, model="bench", build="fake"
    )
    # Rendered once per agent: the generator's own CPU must not starve the balancer it
    # measures (two cores here), so a report costs it a few concatenations.
    templates: list[tuple[bytes, bytes, bytes]] = []
    for agent in range(agents):
        before, after = json.dumps(
            build_report(
                status,
                sequence=1234567890,
                interval=1.0,
                name=f"fake-{agent}",
                host="10.0.0.1",
                port=10000 + agent,
            )
        ).split("1234567890")
        head = (
            f"PUT /api/v1/agents/agent{agent} HTTP/1.1\r\nhost: {address}\r\n"
            "content-type: application/json\r\ncontent-length: "
        )
        templates.append((head.encode(), before.encode(), after.encode()))
    sent = failed = late = 0
    why: dict[str, int] = {}
    start = time.perf_counter()
    sequence = 0
    while time.perf_counter() - start < seconds:
        sequence += 1
        round_start = start + (sequence - 1)
        batch = []
        for agent in range(agents):
            due = round_start + agent / agents
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.1:
                late += 1
            start_of_head, start_of_body, end_of_body = templates[agent]
            body = start_of_body + str(sequence).encode() + end_of_body
            request = start_of_head + str(len(body)).encode() + b"\r\n\r\n" + body
            batch.append(asyncio.create_task(_send(pool, address, request)))
        results = await asyncio.gather(*batch, return_exceptions=True)
        sent += len(results)
        failed += sum(1 for ok in results if ok is not True)
        for ok in results:
            if ok is not True:
                reason = repr(ok) if isinstance(ok, BaseException) else f"answered {ok}"
                why[reason] = why.get(reason, 0) + 1
    pool.close()
    return {"sent": sent, "failed": failed, "late": late, "why": why}


async def _send(pool: ConnectionPool, address: str, request: bytes) -> bool | int:
    """True when the report was taken, else the status it got (an error raises)."""
    connection = pool.idle(address) or await pool.connect(address)
    answer = connection.send(request, False)
    try:
        await answer.head(10.0)
        while await answer.body(10.0) is not None:
            pass
        return answer.status == 200 or answer.status
    finally:
        connection.finished(answer)


def management_load(agents: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as raw:
        proxy, management = free_port(), free_port()
        argv = balancer_argv(management, proxy, Path(raw) / "slots", workers=2)
        with process(argv, cwd=ROOT) as balancer:
            wait_http(f"http://127.0.0.1:{management}/health")
            time.sleep(1.0)
            pids = tree(balancer.pid)
            before = cpu_seconds(pids)
            time.sleep(seconds)
            idle = cpu_seconds(pids) - before
            # One round first, so that every agent's row exists before measuring.
            uvloop.run(report_forever(management, agents, 1.0))
            before = cpu_seconds(pids)
            sent = uvloop.run(report_forever(management, agents, seconds))
            busy = cpu_seconds(pids) - before
    return {
        "agents": agents,
        "seconds": seconds,
        **sent,
        "idle_share_of_a_core": idle / seconds,
        "share_of_a_core": busy / seconds,
        "cpu_us_per_report": 1e6 * (busy - idle) / max(1, sent["sent"]),
    }


def choosing(upstreams: int, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as raw:
        table = SlotTable.create(Path(raw) / "slots", max_upstreams=max(upstreams, 8))
        now = time.monotonic()
        for index in range(upstreams):
            table.apply_report(
                UpstreamReport(
                    f"a{index}",
                    f"n{index}",
                    "10.0.0.1",
                    10000 + index,
                    UpstreamState.READY,
                    4,
                    4,
                    0,
                    "bench",
                    "",
                    "",
                    1,
                    3600.0,
                ),
                now,
            )
        table.join()
        held = []

        def acquire() -> None:
            granted = table.acquire(0, Policy(time.monotonic(), 3, None))
            assert granted is not None
            held.append(granted[0])

        def release() -> None:
            table.release(held.pop())

        result = {}
        for label, call in (("acquire_us", acquire), ("release_us", release)):
            # In pairs so that slots never run out: time the one half, do the other.
            total = 0.0
            for _ in range(repeat):
                if call is release:
                    acquire()
                total += timeit.timeit(call, number=1)
                if call is acquire:
                    release()
            result[label] = 1e6 * total / repeat
        table.close()
        return result


def _median(runs: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    values = [run[key] for run in runs]
    return statistics.median(values), min(values), max(values)


def _cell(runs: list[dict[str, Any]], key: str, form: str) -> str:
    """The median, and the spread when there are several runs."""
    median, low, high = _median(runs, key)
    text = form.format(median)
    return text + (f" ({form.format(low)}-{form.format(high)})" if len(runs) > 1 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="5 s of reports, one repetition")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--repetitions",
        type=int,
        default=3,
        help="every figure is the median of this many runs, with their spread",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    seconds = 5.0 if args.smoke else args.seconds
    repetitions = 1 if args.smoke else args.repetitions
    ones, manys, loads = [], [], []
    for _ in range(repetitions):
        ones.append(choosing(1, 5000))
        manys.append(choosing(args.agents, 5000))
        loads.append(management_load(args.agents, seconds))
    acquire = _median(manys, "acquire_us")[0] / _median(ones, "acquire_us")[0]
    release = _median(manys, "release_us")[0] / _median(ones, "release_us")[0]
    lines = [
        f"| figure | {args.agents} upstreams | baseline | ratio |",
        "| --- | --- | --- | --- |",
        f"| choosing and reserving a slot (us) | {_cell(manys, 'acquire_us', '{:.1f}')} | "
        f"{_cell(ones, 'acquire_us', '{:.1f}')} (1 upstream) | {acquire:.1f} |",
        f"| releasing it (us) | {_cell(manys, 'release_us', '{:.1f}')} | "
        f"{_cell(ones, 'release_us', '{:.1f}')} | {release:.1f} |",
        f"| balancer CPU with {args.agents} agents reporting each second, share of one core "
        f"| {_cell(loads, 'share_of_a_core', '{:.2f}')} | "
        f"{_cell(loads, 'idle_share_of_a_core', '{:.3f}')} (idle) | - |",
        f"| CPU per report (us, idle subtracted) | {_cell(loads, 'cpu_us_per_report', '{:.0f}')} "
        "| - | - |",
        "",
        f"Reports sent {sum(load['sent'] for load in loads)}, failed "
        f"{sum(load['failed'] for load in loads)}, sent over 0.1 s late "
        f"{sum(load['late'] for load in loads)}"
        + "".join(f"; {reason}: {count}" for load in loads for reason, count in load["why"].items())
        + (f". Medians of {repetitions} runs, and their spread." if repetitions > 1 else "."),
    ]
    table = "\n".join(lines)
    print(table)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
            "seconds": seconds,
            "repetitions": repetitions,
        }
        (args.out / "scale.json").write_text(
            json.dumps({"meta": meta, "one": ones, "many": manys, "load": loads}, indent=2) + "\n"
        )
        (args.out / "scale.md").write_text(
            f"# Scale ({meta['date']}, {meta['cpus']} CPUs)\n\n"
            f"`{' '.join(['python', 'bench/scale.py', *sys.argv[1:]])}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
