"""A/B: the balancer's CPU per proxied request, this checkout against an earlier commit.

    python bench/ab.py --base HEAD~1                       # JSON, 4 rounds of 5 s
    python bench/ab.py --base 7a5495f --workload sse --rounds 6

This machine's speed drifts by tens of percent within an hour, so a change is judged
against its base in one run: both builds, in front of the same two fake upstreams
(bench/fake_upstream.py), alternately in ABBA order (in plain ABAB order the second of
every pair measured up to 30 % slower, whichever build it was). Each cell is wrk at
concurrency 32 (JSON) or 16 (SSE) through a 2-worker balancer; the CPU is utime + stime
of all the balancer's processes over the cell. Prints each cell, the medians and the
ratio B/A. Needs wrk (Debian's package; bench/proxy_overhead.py installs it).
"""

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from proxy_overhead import (
    BODIES,
    ROOT,
    balancer_argv,
    cpu_per_thousand,
    ensure_tools,
    fake_upstreams,
    process,
    register,
    stop_cleanly_on_sigterm,
    tree,
    wait_http,
)

from paddler.testbed.ports import free_port


def export(revision: str, target: Path) -> Path:
    """The paddler package as it was at ``revision``, unpacked under ``target``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "paddler"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


@contextmanager
def balancer(tree_root: Path, upstreams: list[int], work: Path) -> Iterator[tuple[int, list[int]]]:
    management, port = free_port(), free_port()
    argv = balancer_argv(management, port, work / f"slots-{port}", workers=2)
    # -m paddler from tree_root: the interpreter imports that tree's package first.
    with process(argv, log=work / "balancer.log", cwd=tree_root) as proc:
        wait_http(f"http://127.0.0.1:{management}/health")
        for upstream in upstreams:
            register(management, upstream, f"fake-{upstream}")
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        time.sleep(0.5)
        yield port, tree(proc.pid)


def cell(tree_root: Path, upstreams: list[int], work: Path, workload: str, seconds: float) -> float:
    """CPU milliseconds per 1,000 requests of one build."""
    with balancer(tree_root, upstreams, work) as (port, pids):
        return cpu_per_thousand(port, pids, workload, seconds, work, str(work / "balancer.log"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with (A)")
    parser.add_argument("--workload", choices=sorted(BODIES), default="json")
    parser.add_argument("--rounds", type=int, default=4, help="ABBA rounds (4 cells each)")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    ensure_tools()
    results: dict[str, list[float]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as raw:
        work = Path(raw)
        trees = {"A": export(args.base, work / "base"), "B": ROOT}
        with fake_upstreams() as upstreams:
            for round_number in range(args.rounds):
                for build in ("A", "B", "B", "A"):
                    value = cell(trees[build], upstreams, work, args.workload, args.seconds)
                    results[build].append(value)
                    print(
                        f"round {round_number + 1} {build}: {value:.1f} ms per 1,000",
                        file=sys.stderr,
                    )
    a, b = statistics.median(results["A"]), statistics.median(results["B"])
    print(
        f"{args.workload}: A ({args.base}) {a:.1f}, B (this checkout) {b:.1f} ms CPU per "
        f"1,000 requests (medians of {len(results['A'])}); B/A = {b / a:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
