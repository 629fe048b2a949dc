"""Part 1 of the benchmarks: what a proxy itself costs, Paddler against nginx and HAProxy.

    python bench/proxy_overhead.py             # 3 repetitions, about 30 minutes
    python bench/proxy_overhead.py --smoke     # 1 repetition of 1 s cells, about 2 minutes

Every arm stands in front of the same two fast fake upstreams (bench/fake_upstream.py):
direct access (the client spreads requests itself), nginx round robin, nginx least_conn
(shared zone), HAProxy leastconn (all from Debian's packages, 2 workers or threads, kept-
alive upstream connections) and Paddler's balancer (2 workers). Per arm and workload
(plain JSON chat completions; 64-event SSE streams):

- closed loop (wrk): latency at concurrency 1; requests/s at 32 (JSON) or 16 (SSE), and
  the proxy's CPU time per 1,000 requests over that cell (utime + stime from /proc, all
  of the arm's processes) and its resident memory;
- open loop (bench/open_loop.py, a seeded Poisson schedule, the same for every arm):
  latency p50/p99/p99.9 at two fixed rates, and the highest rate of a doubling ramp held
  with p99 under 10 ms and no errors (the ramp stops at two failing rates in a row, so
  that one noisy step on a shared machine does not end it).

Every figure is also given against nginx least_conn's from the same run; each repetition
runs every arm again, and tables give the median with the spread. wrk, nginx and HAProxy
are installed from Debian's packages when missing (needs root).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paddler.llamacpp.client import UpstreamStatus  # noqa: E402
from paddler.reports import build_report  # noqa: E402
from paddler.slots import UpstreamState  # noqa: E402
from paddler.testbed.ports import free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BODIES = {
    "json": '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}',
    "sse": '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": true}',
}


def ensure_tools() -> None:
    missing = [
        tool
        for tool, package in (("nginx", "nginx"), ("wrk", "wrk"), ("haproxy", "haproxy"))
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if missing:
        print(f"installing {', '.join(missing)} from Debian's packages", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [pid]
    if children.exists():
        for child in children.read_text().split():
            found += tree(int(child))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


@contextmanager
def process(
    argv: list[str], log: Path | None = None, **kwargs: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the block; its output goes to ``log`` (appended) or nowhere."""
    output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=output, stderr=output, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        with_suppress_kill(proc)
        if log:
            output.close()  # type: ignore[union-attr]


def stop_cleanly_on_sigterm() -> None:
    """A benchmark stopped with SIGTERM (kill, a CI timeout) unwinds like one stopped by
    Ctrl-C: every process() block stops what it started, and no llama-server, nginx or
    balancer is left running behind it."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def with_suppress_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


NGINX_CONF = """
worker_processes 2;
pid {dir}/nginx-{name}.pid;
error_log {dir}/nginx-{name}.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream fake {{
        {policy}
        server 127.0.0.1:{upstream1};
        server 127.0.0.1:{upstream2};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout {read_timeout}s;
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread 2
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server {read_timeout}s
    option http-keep-alive
    http-reuse always
frontend proxy
    bind 127.0.0.1:{port}
    default_backend fake
backend fake
    balance leastconn
    server one 127.0.0.1:{upstream1}
    server two 127.0.0.1:{upstream2}
"""

ARMS = ("direct", "nginx-rr", "nginx-leastconn", "haproxy-leastconn", "paddler")
BASELINE = "nginx-leastconn"
# Closed-loop concurrency for throughput and CPU, and the open loop's fixed rates and
# ramp, per workload.
CONCURRENCY = {"json": 32, "sse": 16}
FIXED_RATES = {"json": (500, 1000), "sse": (100, 200)}
RAMP: dict[str, tuple[int, ...]] = {
    "json": (250, 500, 1000, 2000, 4000),
    "sse": (50, 100, 200, 400, 800),
}
P99_BOUND_MS = 10.0


def wrk(url: str, body: str, connections: int, seconds: float, workdir: Path) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = {
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "errors": 0.0,
    }
    for label, key in (("50%", "p50"), ("99%", "p99")):
        match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)", out)
        if match:
            value = float(match.group(1))
            result[key] = (
                value / 1000
                if match.group(2) == "us"
                else (value if match.group(2) == "ms" else value * 1000)
            )
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), "
        r"timeout (\d+)",
        out,
    )
    result["errors"] = float(errors.group(1)) if errors else 0.0
    if socket_errors:
        result["errors"] += sum(float(n) for n in socket_errors.groups())
    result["rps"] = result["requests"] / seconds
    return result


def cpu_per_thousand(
    port: int, pids: list[int], workload: str, seconds: float, work: Path, log: str
) -> float:
    """CPU milliseconds per 1,000 requests of the processes ``pids`` serving ``port``,
    under a closed-loop wrk cell of Part 1 (after a warm-up); ``log`` says where to look
    when the cell had errors."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = BODIES[workload]
    wrk(url, body, 4, 1.0, work)  # warm connections and caches
    before = cpu_seconds(pids)
    load = wrk(url, body, CONCURRENCY[workload], seconds, work)
    used = cpu_seconds(pids) - before
    if load["errors"]:
        raise RuntimeError(f"{load['errors']:.0f} errors; see {log}")
    return 1_000_000 * used / load["requests"]


def open_loop(addresses: list[str], body: str, rate: float, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "open_loop.py"),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--seed",
            "7",
            "--body",
            body,
            *addresses,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def measure(
    name: str, port: int | None, upstreams: list[int], pids: list[int], seconds: float, work: Path
) -> dict[str, Any]:
    """Every cell of one arm; ``port`` None means direct access to the upstreams."""
    addresses = [f"127.0.0.1:{port}"] if port else [f"127.0.0.1:{u}" for u in upstreams]
    # wrk takes one address: direct access gets the first upstream's.
    url = f"http://{addresses[0]}/v1/chat/completions"
    cells: dict[str, Any] = {}
    for workload, body in BODIES.items():
        if name == "paddler":
            settle(port, len(upstreams))
        wrk(url, body, 4, 1.0, work)  # warm the connections and caches
        latency = wrk(url, body, 1, seconds, work)
        before = cpu_seconds(pids)
        load = wrk(url, body, CONCURRENCY[workload], seconds, work)
        cpu = cpu_seconds(pids) - before
        cell: dict[str, Any] = {
            "p50_ms_c1": latency["p50"],
            "p99_ms_c1": latency["p99"],
            "rps_closed": load["rps"],
            "p99_ms_closed": load["p99"],
            "cpu_ms_per_1000": 1_000_000 * cpu / load["requests"] if pids else 0.0,
            "errors": latency["errors"] + load["errors"],
        }
        for rate in FIXED_RATES[workload]:
            cell[f"open_{rate}"] = open_loop(addresses, body, rate, seconds)
            cell["errors"] += cell[f"open_{rate}"]["errors"]
            failures = cell[f"open_{rate}"]["failures"]
            if failures:
                print(f"{name} {workload} at {rate}/s failed: {failures}", file=sys.stderr)
        held = 0.0
        missed = 0
        for rate in RAMP[workload]:
            step = open_loop(addresses, body, rate, seconds / 2)
            if step["errors"] or step["latency_ms"]["p99"] > P99_BOUND_MS:
                missed += 1
                if missed == 2:
                    break  # two rates in a row over the bound: past the knee, not noise
                continue
            missed = 0
            held = rate
        cell["highest_rate_p99_under_10ms"] = held
        cells[workload] = cell
        fixed = cell[f"open_{FIXED_RATES[workload][0]}"]["latency_ms"]
        print(
            f"{name:17} {workload:4} c1 p50 {latency['p50']:.3f} ms  "
            f"{load['rps']:.0f} req/s at c={CONCURRENCY[workload]}  "
            f"cpu {cell['cpu_ms_per_1000']:.0f} ms/1000  "
            f"open p99 {fixed['p99']:.2f} ms  held {held:.0f}/s",
            file=sys.stderr,
        )
    cells["rss_mb"] = rss_mb(pids)
    return cells


def settle(port: int | None, upstreams: int, limit: float = 90.0) -> None:
    """Wait until Paddler holds no request: nothing queued, no slot taken; and check that
    its fleet still has every upstream, ready.

    The ramp before a workload's cells drives the arm past its knee on purpose. nginx
    and HAProxy pass the overload on to the fake upstreams; Paddler holds it in its
    queue, bounded by request_buffer_timeout (30 s) and by slots that free only as the
    overloaded fake upstreams answer; the next workload's cells start after it.
    """
    deadline = time.monotonic() + limit
    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            health = None
        if health is not None and health["upstreams"] != {"ready": upstreams}:
            # A fleet that lost an upstream measures something else: say so, loudly.
            raise RuntimeError(f"paddler's fleet is not {upstreams} ready upstreams: {health}")
        if health is not None and not health["queued"] and not health["slots"]["processing"]:
            waited = time.monotonic() - started
            if waited > 1:
                print(f"paddler settled after {waited:.0f} s", file=sys.stderr)
            return
        time.sleep(0.5)
    print(f"paddler still busy after {limit:g} s; measuring anyway", file=sys.stderr)


def register(management: int, upstream: int, name: str) -> None:
    """Report the fake upstream as an agent would, with room for every connection."""
    status = UpstreamStatus(
        UpstreamState.READY, slots_total=1024, slots_idle=1024, model="bench", build="fake"
    )
    report = build_report(
        status, sequence=1, interval=3600, name=name, host="127.0.0.1", port=upstream
    )
    httpx.put(
        f"http://127.0.0.1:{management}/api/v1/agents/bench-{name}", json=report, timeout=5
    ).raise_for_status()


def balancer_argv(management: int, proxy: int, slot_table: Path, workers: int) -> list[str]:
    """Paddler's balancer from this checkout, by its original command line."""
    return [
        sys.executable,
        "-m",
        "paddler",
        "balancer",
        "--management-port",
        str(management),
        "--reverseproxy-port",
        str(proxy),
        "--workers",
        str(workers),
        "--slot-table",
        str(slot_table),
    ]


def proxy_argv(
    name: str, upstreams: list[int], port: int, work: Path, read_timeout: int = 60
) -> list[str]:
    """The command line of an nginx or HAProxy arm in front of two upstreams, its
    configuration written to ``work``; ``read_timeout``: seconds an answer may pause."""
    one, two = upstreams
    if name.startswith("nginx"):
        policy = "least_conn; zone fake 64k;" if name == "nginx-leastconn" else ""
        conf = work / f"{name}.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=work,
                name=name,
                policy=policy,
                upstream1=one,
                upstream2=two,
                port=port,
                read_timeout=read_timeout,
            )
        )
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-g", "daemon off;"]
    conf = work / "haproxy.cfg"
    conf.write_text(
        HAPROXY_CONF.format(port=port, upstream1=one, upstream2=two, read_timeout=read_timeout)
    )
    return [shutil.which("haproxy") or "/usr/sbin/haproxy", "-f", str(conf), "-db"]


@contextmanager
def arm(name: str, upstreams: list[int], work: Path) -> Iterator[tuple[int | None, list[int]]]:
    """Start one arm; its port (None: direct) and the pids whose CPU counts."""
    if name == "direct":
        yield None, []
        return
    port = free_port()
    if name == "bare":  # bench/floor.py's: the floor of a Python proxy
        script = str(ROOT / "bench" / "bare_proxy.py")
        argv = [sys.executable, script, str(port), "2", *map(str, upstreams)]
    elif name != "paddler":
        argv = proxy_argv(name, upstreams, port, work)
    else:
        management = free_port()
        argv = balancer_argv(management, port, work / "slots", workers=2)
    # Each arm's own log, kept with the run: a cell with errors says why there.
    with process(argv, log=work / f"{name}.log", cwd=ROOT) as proc:
        if name == "paddler":
            wait_http(f"http://127.0.0.1:{management}/health")
            for upstream in upstreams:
                register(management, upstream, f"fake-{upstream}")
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        time.sleep(0.5)  # let every worker start
        yield port, tree(proc.pid)


@contextmanager
def fake_upstreams() -> Iterator[list[int]]:
    """The two fake upstreams every arm stands in front of, answering; their ports."""
    upstreams = [free_port(), free_port()]
    fake = [sys.executable, str(ROOT / "bench" / "fake_upstream.py")]
    with process([*fake, str(upstreams[0])]), process([*fake, str(upstreams[1])]):
        for upstream in upstreams:
            wait_http(f"http://127.0.0.1:{upstream}/health")
        yield upstreams


def run(seconds: float, repetitions: int) -> dict[str, list[dict[str, Any]]]:
    ensure_tools()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory() as raw:
        work = Path(raw)
        with fake_upstreams() as upstreams:
            for repetition in range(repetitions):
                print(f"repetition {repetition + 1} of {repetitions}", file=sys.stderr)
                for name in ARMS:
                    with arm(name, upstreams, work) as (port, pids):
                        results[name].append(measure(name, port, upstreams, pids, seconds, work))
                    _report_trouble(name, work / f"{name}.log", results[name][-1])
    return results


def _report_trouble(name: str, log: Path, cells: dict[str, Any]) -> None:
    """When an arm had errors, print what its log says about them."""
    if not any(cells[workload]["errors"] for workload in BODIES) or not log.exists():
        return
    lines = log.read_text(errors="replace").splitlines()
    trouble = [line for line in lines if "WARNING" in line or "ERROR" in line or "Trace" in line]
    print(f"{name}: errors; the last lines of its log that say why:", file=sys.stderr)
    for line in (trouble or lines)[-20:]:
        print(f"  {line}", file=sys.stderr)


def _values(runs: list[dict[str, Any]], workload: str, path: tuple[str, ...]) -> list[float]:
    values = []
    for one in runs:
        value: Any = one[workload] if workload else one
        for key in path:
            value = value[key]
        values.append(float(value))
    return values


def summary(runs: list[dict[str, Any]], workload: str, *path: str) -> dict[str, float]:
    values = _values(runs, workload, path)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


FIGURES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("added p50 at c=1 (ms)", ("p50_ms_c1",), "{:.3f}"),
    ("requests/s closed loop", ("rps_closed",), "{:.0f}"),
    ("CPU ms per 1,000 requests", ("cpu_ms_per_1000",), "{:.0f}"),
    ("open loop, lower rate: p50 (ms)", ("open_low", "latency_ms", "p50"), "{:.2f}"),
    ("open loop, lower rate: p99 (ms)", ("open_low", "latency_ms", "p99"), "{:.2f}"),
    ("open loop, lower rate: p99.9 (ms)", ("open_low", "latency_ms", "p999"), "{:.2f}"),
    ("open loop, higher rate: p99 (ms)", ("open_high", "latency_ms", "p99"), "{:.2f}"),
    ("highest rate with p99 < 10 ms (/s)", ("highest_rate_p99_under_10ms",), "{:.0f}"),
    ("errors", ("errors",), "{:.0f}"),
)


def _normalise(results: dict[str, list[dict[str, Any]]]) -> None:
    """Name the fixed-rate cells by their place (low, high), and make added latency added."""
    for runs in results.values():
        for index, one in enumerate(runs):
            for workload in BODIES:
                low, high = FIXED_RATES[workload]
                one[workload]["open_low"] = one[workload][f"open_{low}"]
                one[workload]["open_high"] = one[workload][f"open_{high}"]
                direct = results["direct"][index][workload]["p50_ms_c1"]
                one[workload]["added_p50_ms_c1"] = one[workload]["p50_ms_c1"] - direct


def tables(results: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    _normalise(results)
    compared: dict[str, Any] = {}
    lines: list[str] = []
    for workload in BODIES:
        low, high = FIXED_RATES[workload]
        lines += [
            f"### {workload.upper()} (closed loop at c={CONCURRENCY[workload]}; open loop "
            f"at {low} and {high}/s)",
            "",
            "| figure | " + " | ".join(ARMS) + f" | Paddler / {BASELINE} |",
            "|" + " --- |" * (len(ARMS) + 2),
        ]
        compared[workload] = {}
        for label, path, form in FIGURES:
            key = ("added_p50_ms_c1",) if path == ("p50_ms_c1",) else path
            cells = []
            medians = {}
            for name in ARMS:
                if name == "direct" and path in (("cpu_ms_per_1000",), ("p50_ms_c1",)):
                    cells.append("-")
                    continue
                figure = summary(results[name], workload, *key)
                medians[name] = figure["median"]
                spread = (
                    f" ({form.format(figure['min'])}-{form.format(figure['max'])})"
                    if figure["min"] != figure["max"]
                    else ""
                )
                cells.append(form.format(figure["median"]) + spread)
            base = medians.get(BASELINE, 0.0)
            ratio = medians.get("paddler", 0.0) / base if base else float("nan")
            compared[workload][label] = ratio
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} |")
        lines.append("")
    memory = [
        f"{name} {statistics.median(_values(results[name], '', ('rss_mb',))):.0f} MB"
        for name in ARMS
        if name != "direct"
    ]
    lines.append("Resident memory, all of an arm's processes: " + ", ".join(memory) + ".")
    compared["rss_mb_paddler"] = statistics.median(_values(results["paddler"], "", ("rss_mb",)))
    return "\n".join(lines), compared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="1 repetition of 1 s cells, the ramp's first 3 rates"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    seconds = 1.0 if args.smoke else args.seconds
    repetitions = 1 if args.smoke else args.repetitions
    if args.smoke:
        global RAMP
        RAMP = {workload: rates[:3] for workload, rates in RAMP.items()}
    results = run(seconds, repetitions)
    table, compared = tables(results)
    print(table)
    if not args.smoke:
        meta = {
            **machine(),
            "nginx": _version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
            "haproxy": _version([shutil.which("haproxy") or "/usr/sbin/haproxy", "-v"]),
            "seconds_per_cell": seconds,
            "repetitions": repetitions,
        }
        write_results(
            args.out,
            "proxy_overhead",
            "Proxy overhead",
            {"meta": meta, "results": results, "paddler_against": compared},
            f"{seconds:g} s per cell, {repetitions} repetitions (median, and min-max where "
            f"they differ); {meta['nginx']}; {meta['haproxy']}.\n\n{table}",
        )
    return 0


def machine() -> dict[str, Any]:
    """Where and when a run was measured."""
    return {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(out: Path, stem: str, title: str, data: dict[str, Any], text: str) -> None:
    """``stem``.json (everything measured) and ``stem``.md (the tables, headed by the
    machine and the command line that ran them) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    meta = data["meta"]
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(
        f"# {title} ({meta['date']}, {meta['cpus']} CPUs, {meta['machine']})\n\n"
        f"`{' '.join(['python', f'bench/{Path(sys.argv[0]).name}', *sys.argv[1:]])}`: "
        f"{text}\n"
    )


def _version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


if __name__ == "__main__":
    sys.exit(main())
