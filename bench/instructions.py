"""Instructions per proxied request, counted by Valgrind's callgrind: a measure that this
machine's drift does not move.

    python bench/instructions.py                        # JSON and SSE, every arm
    python bench/instructions.py --workload sse --arms paddler-least_busy,bare

CPU time per request drifts by tens of percent on this machine within an hour
(docs/performance.md); the instructions a worker executes per request do not (two runs
of one build agree within about 2 %), so a change to the hot path can be judged in
minutes. Each arm runs with one worker process under callgrind, twice, behind the same
two fake upstreams (bench/fake_upstream.py): once with a warm-up only, once with the
warm-up and then wrk at concurrency 16 for --seconds. The worker's extra instructions
divided by the extra requests is its cost per request. Arms: Paddler with its default
routing (cache_aware), Paddler with least_busy, and bench/bare_proxy.py (uvloop and
httptools and nothing else), the baseline that every arm is printed against.

What it leaves out: time in the kernel (a system call costs the same few instructions
to make however long the kernel takes), and cache misses. A change that adds or removes
system calls is judged by CPU time as well (bench/ab.py, bench/floor.py).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy_overhead import (
    BODIES,
    ROOT,
    balancer_argv,
    fake_upstreams,
    process,
    register,
    stop_cleanly_on_sigterm,
    wait_http,
    wrk,
)

from paddler.testbed.ports import free_port

ARMS = ("paddler", "paddler-least_busy", "bare")
CONCURRENCY = 16
# Under callgrind a worker runs some fifty times slower: it starts in tens of seconds.
START_TIMEOUT = 600.0


def ensure_valgrind() -> None:
    if shutil.which("valgrind") is None:
        print("installing valgrind from Debian's packages", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True, env=env)


def total_instructions(profile: Path) -> int:
    for line in profile.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"{profile} has no totals")


def counted(
    name: str, upstreams: list[int], work: Path, workload: str, seconds: float
) -> tuple[float, int]:
    """Requests served and the busiest process's instructions (the worker's: the master
    only waits) in one run of arm ``name``; no load beyond the warm-up if ``seconds`` is 0."""
    tag = f"{name}-{workload}-{seconds:g}"
    port = free_port()
    if name == "bare":
        argv = [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), str(port), "1"]
        argv += [str(upstream) for upstream in upstreams]
    else:
        management = free_port()
        argv = balancer_argv(management, port, work / f"{tag}.slots", workers=1)
        if name.startswith("paddler-"):
            argv += ["--routing-policy", name.removeprefix("paddler-")]
    callgrind = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={work}/{tag}.%p.callgrind",
        "--dump-instr=no",
    ]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with process(callgrind + argv, log=work / f"{tag}.log", cwd=ROOT):
        if name != "bare":
            wait_http(f"http://127.0.0.1:{management}/health", START_TIMEOUT)
            for upstream in upstreams:
                register(management, upstream, f"fake-{upstream}")
        wait_http(f"http://127.0.0.1:{port}/v1/models", START_TIMEOUT)
        time.sleep(2)  # the worker's own start-up, done
        requests = wrk(url, BODIES[workload], 4, 2, work)["requests"]
        if seconds:
            load = wrk(url, BODIES[workload], CONCURRENCY, seconds, work)
            if load["errors"]:
                raise RuntimeError(f"{load['errors']:.0f} errors; see {work}/{tag}.log")
            requests += load["requests"]
    # Each process writes its profile as it exits.
    deadline = time.monotonic() + 30
    profiles: list[Path] = []
    while time.monotonic() < deadline:
        profiles = list(work.glob(f"{tag}.*.callgrind"))
        if profiles and all(profile.stat().st_size for profile in profiles):
            break
        time.sleep(0.5)
    return requests, max(total_instructions(profile) for profile in profiles)


def per_request(
    name: str, upstreams: list[int], work: Path, workload: str, seconds: float
) -> float:
    quiet_requests, quiet = counted(name, upstreams, work, workload, 0)
    loaded_requests, loaded = counted(name, upstreams, work, workload, seconds)
    return (loaded - quiet) / (loaded_requests - quiet_requests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=[*sorted(BODIES), "both"], default="both")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the callgrind profiles here (callgrind_annotate --inclusive=yes reads "
        "them; the compiled hot path's functions carry their module's and their own names)",
    )
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; the arms are {', '.join(ARMS)}")
    stop_cleanly_on_sigterm()
    ensure_valgrind()
    workloads = sorted(BODIES) if args.workload == "both" else [args.workload]
    with tempfile.TemporaryDirectory() as raw, fake_upstreams() as upstreams:
        work = Path(raw)
        for workload in workloads:
            results = {}
            for name in arms:
                results[name] = per_request(name, upstreams, work, workload, args.seconds)
                print(f"{workload} {name}: {results[name]:,.0f} instructions", file=sys.stderr)
                if args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    for profile in work.glob(f"{name}-{workload}-*.callgrind"):
                        shutil.copy2(profile, args.keep / profile.name)
            base = results.get("bare")
            print(
                f"{workload}: instructions per request: "
                + ", ".join(
                    f"{name} {value:,.0f}" + (f" ({value / base:.2f} x bare)" if base else "")
                    for name, value in results.items()
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
