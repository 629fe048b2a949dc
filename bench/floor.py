"""How far Paddler is from the floor of any Python proxy, against nginx, on this machine.

    python bench/floor.py                      # JSON and SSE, 3 rounds of 5 s
    python bench/floor.py --workload sse --rounds 5

Three arms in front of the same two fake upstreams (bench/fake_upstream.py), under the
load of Part 1's closed-loop cells (wrk at concurrency 32 for JSON, 16 for SSE), each
with 2 worker processes: nginx least_conn, bench/bare_proxy.py (uvloop and httptools
and nothing else: no slots, queue, retries, timeouts, metrics or header rules) and
Paddler. The arms take turns within each round, in an order that rotates from round to
round, since this machine's speed drifts by tens of percent within an hour. Prints CPU
per 1,000 requests (utime + stime of all the arm's processes), the medians, and each
against nginx: what issue 4's bar (5 and 1.5 times nginx) asks of Paddler, next to what
a proxy that does nothing else costs.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from proxy_overhead import (
    BODIES,
    arm,
    cpu_per_thousand,
    ensure_tools,
    fake_upstreams,
    stop_cleanly_on_sigterm,
)

ARMS = ("nginx-leastconn", "bare", "paddler")


def cell(name: str, upstreams: list[int], work: Path, workload: str, seconds: float) -> float:
    """CPU milliseconds per 1,000 requests of one arm."""
    with arm(name, upstreams, work) as (port, pids):
        assert port is not None
        return cpu_per_thousand(port, pids, workload, seconds, work, f"{work}/{name}.log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=[*sorted(BODIES), "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    ensure_tools()
    workloads = sorted(BODIES) if args.workload == "both" else [args.workload]
    results: dict[tuple[str, str], list[float]] = {
        (workload, name): [] for workload in workloads for name in ARMS
    }
    with tempfile.TemporaryDirectory() as raw:
        work = Path(raw)
        with fake_upstreams() as upstreams:
            for round_number in range(args.rounds):
                turn = round_number % len(ARMS)
                for name in ARMS[turn:] + ARMS[:turn]:
                    for workload in workloads:
                        value = cell(name, upstreams, work, workload, args.seconds)
                        results[(workload, name)].append(value)
                        print(
                            f"round {round_number + 1} {workload} {name}: {value:.1f} ms per 1,000",
                            file=sys.stderr,
                        )
    for workload in workloads:
        medians = {name: statistics.median(results[(workload, name)]) for name in ARMS}
        nginx = medians["nginx-leastconn"]
        print(
            f"{workload}: CPU ms per 1,000 requests, medians of {args.rounds}: "
            + ", ".join(
                f"{name} {value:.1f} ({value / nginx:.2f} x nginx)"
                for name, value in medians.items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
