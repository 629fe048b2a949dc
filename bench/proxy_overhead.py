"""Part 1 of the benchmarks: what the proxy itself costs, against nginx and direct access.

    python bench/proxy_overhead.py             # about 3 minutes
    python bench/proxy_overhead.py --smoke     # a few seconds per cell: does it still work

Every arm proxies the same fast fake upstream (bench/fake_upstream.py): direct access,
nginx (1.22 from Debian, upstream keep-alive, 2 workers) and Paddler's balancer (2
workers). wrk drives plain JSON chat completions and 64-event SSE streams; each cell's
figures are taken in the same run, and every one is also given as a ratio against
nginx's. CPU is the proxy processes' own (utime + stime from /proc, all of them).
Installs nginx and wrk from Debian's packages when they are missing (needs root).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
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
        for tool, package in (("nginx", "nginx"), ("wrk", "wrk"))
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
def process(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kwargs
    )
    try:
        yield proc
    finally:
        with_suppress_kill(proc)


def with_suppress_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


NGINX_CONF = """
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream fake {{ server 127.0.0.1:{upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


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


def measure(name: str, url: str, pids: list[int], seconds: float, workdir: Path) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for workload, body in BODIES.items():
        wrk(url, body, 4, 1.0, workdir)  # warm the connections and caches
        latency = wrk(url, body, 1, seconds, workdir)
        before = cpu_seconds(pids)
        load = wrk(url, body, 32, seconds, workdir)
        cpu = cpu_seconds(pids) - before
        cells[workload] = {
            "p50_ms_c1": latency["p50"],
            "p99_ms_c1": latency["p99"],
            "rps_c32": load["rps"],
            "p99_ms_c32": load["p99"],
            "cpu_ms_per_request": 1000 * cpu / load["requests"] if pids else 0.0,
            "errors": latency["errors"] + load["errors"],
        }
        print(
            f"{name:8} {workload:4} p50 {latency['p50']:.3f} ms  {load['rps']:.0f} req/s  "
            f"cpu {cells[workload]['cpu_ms_per_request']:.3f} ms/req",
            file=sys.stderr,
        )
    cells["rss_mb"] = rss_mb(pids)
    return cells


def register(management: int, upstream: int) -> None:
    """Report the fake upstream as an agent would, with room for every connection."""
    status = UpstreamStatus(
        UpstreamState.READY, slots_total=1024, slots_idle=1024, model="bench", build="fake"
    )
    report = build_report(
        status, sequence=1, interval=3600, name="fake", host="127.0.0.1", port=upstream
    )
    httpx.put(
        f"http://127.0.0.1:{management}/api/v1/agents/bench", json=report, timeout=5
    ).raise_for_status()


def run(seconds: float) -> dict[str, Any]:
    ensure_tools()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as raw:
        workdir = Path(raw)
        upstream = free_port()
        with process([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), str(upstream)]):
            wait_http(f"http://127.0.0.1:{upstream}/health")
            results["direct"] = measure(
                "direct", f"http://127.0.0.1:{upstream}/v1/chat/completions", [], seconds, workdir
            )
            nginx_port = free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=workdir, upstream=upstream, port=nginx_port))
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            with process([nginx, "-c", str(conf), "-g", "daemon off;"]) as proc:
                wait_http(f"http://127.0.0.1:{nginx_port}/")
                results["nginx"] = measure(
                    "nginx",
                    f"http://127.0.0.1:{nginx_port}/v1/chat/completions",
                    tree(proc.pid),
                    seconds,
                    workdir,
                )
            proxy, management = free_port(), free_port()
            with process(
                [
                    sys.executable,
                    "-m",
                    "paddler",
                    "balancer",
                    "--management-port",
                    str(management),
                    "--reverseproxy-port",
                    str(proxy),
                    "--workers",
                    "2",
                    "--slot-table",
                    str(workdir / "slots"),
                ],
                cwd=ROOT,
            ) as proc:
                wait_http(f"http://127.0.0.1:{management}/health")
                register(management, upstream)
                results["paddler"] = measure(
                    "paddler",
                    f"http://127.0.0.1:{proxy}/v1/chat/completions",
                    tree(proc.pid),
                    seconds,
                    workdir,
                )
    return results


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    nginx, paddler, direct = results["nginx"], results["paddler"], results["direct"]
    table: dict[str, Any] = {}
    for workload in BODIES:
        table[workload] = {
            "cpu_per_request_vs_nginx": paddler[workload]["cpu_ms_per_request"]
            / nginx[workload]["cpu_ms_per_request"],
            "rps_c32_vs_nginx": paddler[workload]["rps_c32"] / nginx[workload]["rps_c32"],
            "added_p50_ms_paddler": paddler[workload]["p50_ms_c1"] - direct[workload]["p50_ms_c1"],
            "added_p50_ms_nginx": nginx[workload]["p50_ms_c1"] - direct[workload]["p50_ms_c1"],
        }
    table["rss_mb_paddler"] = paddler["rss_mb"]
    return table


def markdown(results: dict[str, Any], compared: dict[str, Any]) -> str:
    lines = [
        "| arm | workload | p50 c=1 (ms) | p99 c=1 (ms) | req/s c=32 | p99 c=32 (ms) "
        "| CPU/request (ms) | errors |",
        "|" + " --- |" * 8,
    ]
    for arm in results:
        for workload in BODIES:
            cell = results[arm][workload]
            lines.append(
                f"| {arm} | {workload} | {cell['p50_ms_c1']:.3f} | "
                f"{cell['p99_ms_c1']:.3f} | {cell['rps_c32']:.0f} | "
                f"{cell['p99_ms_c32']:.2f} | {cell['cpu_ms_per_request']:.3f} | "
                f"{cell['errors']:.0f} |"
            )
    lines += ["", "| Paddler against nginx | json | sse |", "| --- | --- | --- |"]
    for key, label in (
        ("cpu_per_request_vs_nginx", "CPU per request, ratio"),
        ("rps_c32_vs_nginx", "requests/s at c=32, ratio"),
        ("added_p50_ms_paddler", "added p50 at c=1, Paddler (ms)"),
        ("added_p50_ms_nginx", "added p50 at c=1, nginx (ms)"),
    ):
        lines.append(f"| {label} | {compared['json'][key]:.2f} | {compared['sse'][key]:.2f} |")
    lines.append(
        f"\nPaddler's processes (master and 2 workers): {compared['rss_mb_paddler']:.0f} "
        "MB resident."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 s per cell")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    seconds = 2.0 if args.smoke else args.seconds
    results = run(seconds)
    compared = ratios(results)
    table = markdown(results, compared)
    print(table)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "seconds_per_cell": seconds,
            "date": time.strftime("%Y-%m-%d"),
        }
        (args.out / "proxy_overhead.json").write_text(
            json.dumps({"meta": meta, "results": results, "against_nginx": compared}, indent=2)
            + "\n"
        )
        (args.out / "proxy_overhead.md").write_text(
            f"# Proxy overhead ({meta['date']}, {meta['cpus']} CPUs, {meta['machine']})\n\n"
            f"`{' '.join(['python', 'bench/proxy_overhead.py', *sys.argv[1:]])}`, "
            f"{seconds:g} s per cell."
            f"\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
