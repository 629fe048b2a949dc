"""Part 2 of the benchmarks: fleet quality on real llama-servers, Paddler against nginx and HAProxy.

    python bench/fleet_quality.py            # 3 repetitions, about 30 minutes
    python bench/fleet_quality.py --smoke    # 1 repetition of small workloads, about 2 minutes

Two llama-servers with 2 slots each run the generated ~28M-parameter model
(paddler.testbed.models "bench"), each with one thread and pinned to a core of its own, so
that no arm's proxy steals a server's core more than another's. They are restarted for
every cell: every arm starts with cold caches. In front of them stand the arms of Part 1:
direct (the client takes the servers in turn), nginx round robin, nginx least_conn, HAProxy
leastconn, Paddler (balancer and two agents under paddlerd, routing_policy = "least_busy",
the original Paddler's) and paddler-cache (the same with "cache_aware", the default since
2026-11-28; not in --smoke); paddler-cache-unpinned (cache_aware with cache_pin_slots =
false) only when --arms names it. --arms and --workloads pick a subset; --stem names the
results files.

Workloads, drawn from a seed and the same for every arm, streamed chat completions with a
fixed number of output tokens (temperature 0, end of sequence ignored, punctuation only so
that a reply sent back in the next turn is the tokens the model generated, as a real
model's mostly are; see REPLY_GRAMMAR):

- W1 multi-turn chat: sessions of one application (the same system prompt) arriving on a
  Poisson schedule, six turns each; a turn sends the whole conversation so far, the last
  reply included, a moment after it ended.
- W2 shared system prompts: requests from a few groups, each a long system prompt of its
  group and a short question of its own, arriving on a Poisson schedule.
- W3 unique prompts: the same sizes with nothing shared (the control), at a third of
  W2's rate: with no prefix to reuse, each request costs about twice the prefill, and
  W2's rate would overload the fleet (queues of many seconds, whose noise hides any
  difference between arms).
- W4 bursts: bursts of three times the fleet's slots at once.

Per cell: time to first token p50/p90/p99 and end-to-end latency p50/p99, both from the
moment the schedule said to send (slow answers cannot hide a queue); output tokens per
second; errors by status; the most requests llama.cpp held back itself (its
requests_deferred gauge, sampled every 50 ms on every server); the share of prompt
tokens served from cache (llama.cpp's timings: cache_n against cache_n + prompt_n); and
Paddler's queue wait (its X-Paddler-Queue-Ms header). Time to first token p50 and p90
also over every repetition's requests together (POOLED says why). Every other repetition
runs the arms in reverse order.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy_overhead import (  # noqa: E402
    ensure_tools,
    machine,
    process,
    proxy_argv,
    stop_cleanly_on_sigterm,
    wait_http,
    write_results,
)

from paddler.testbed.llama_server import cache_root, ensure_llama_server  # noqa: E402
from paddler.testbed.models import write_model  # noqa: E402
from paddler.testbed.ports import free_port  # noqa: E402

ARMS = (
    "direct",
    "nginx-rr",
    "nginx-leastconn",
    "haproxy-leastconn",
    "paddler",
    "paddler-cache",
    "paddler-cache-unpinned",
)
# Only when asked for (--arms): cache_aware without naming slots, to tell what naming
# them does.
ON_REQUEST = ("paddler-cache-unpinned",)
BASELINE = "nginx-leastconn"
# The ratios the tables give: each (arm, against).
RATIOS = (
    ("paddler", BASELINE),
    ("paddler-cache", BASELINE),
    ("paddler-cache", "paddler"),
    ("paddler-cache-unpinned", "paddler"),
)
# Paddler's arms: least_busy (the original's policy) and cache_aware (the default).
POLICIES = {
    "paddler": "least_busy",
    "paddler-cache": "cache_aware",
    "paddler-cache-unpinned": "cache_aware",
}
SETTINGS = {"paddler-cache-unpinned": "cache_pin_slots = false\n"}
WORKLOADS = ("W1", "W2", "W3", "W4")
SERVERS = 2
SLOTS = 2  # per server
CONTEXT = 8192  # per server: 4096 per slot


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; --smoke shrinks them."""

    sessions: int = 6  # W1
    turns: int = 6
    session_rate: float = 0.4  # sessions started per second
    think: float = 1.0  # seconds between a reply and the next turn
    turn_words: int = 40
    session_system_words: int = 150  # W1's system prompt, the same for every session
    # W2: 72, so that its groups' first requests, which no policy can serve from a cache,
    # are fewer than a tenth (with 24, 3 of them set the p90 of every arm).
    requests: int = 72
    unique_requests: int = 24  # W3
    rate: float = 1.2  # per second, W2
    unique_rate: float = 0.4  # per second, W3: every prompt is new, so each costs more
    groups: int = 3
    system_words: int = 350
    question_words: int = 15
    bursts: int = 3  # W4
    burst_gap: float = 6.0
    burst_words: int = 80
    output_tokens: int = 32


FULL = Sizes()
SMOKE = Sizes(
    sessions=2,
    turns=2,
    session_system_words=50,
    requests=6,
    unique_requests=6,
    rate=3.0,
    unique_rate=3.0,
    system_words=150,
    bursts=1,
    output_tokens=16,
)


@dataclass
class Outcome:
    status: int  # 0: the connection failed
    ttft: float | None = None  # seconds from the scheduled send
    total: float = 0.0
    tokens: int = 0
    prompt_n: int = 0
    cache_n: int = 0
    queued_ms: float | None = None
    text: str = ""
    sent: float = 0.0  # seconds after the cell's start it was due
    upstream: str = ""  # Paddler's X-Paddler-Upstream
    cache_expected: str = ""  # Paddler's X-Paddler-Cache
    slot: str = ""  # Paddler's X-Paddler-Slot: the llama.cpp slot it named
    label: str = ""  # W1: session and turn


@dataclass
class Cell:
    outcomes: list[Outcome] = field(default_factory=list)
    deferred_max: int = 0
    seconds: float = 0.0


# -- prompts ---------------------------------------------------------------------------------

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "xi", "do", "fe")

# Replies of punctuation only (llama.cpp's GBNF). A random-weight model's tokens do not
# survive detokenizing and tokenizing again (it emits "k", "a" where the tokenizer makes
# "ka"), so a reply sent back in the next turn matched nothing after the previous prompt,
# in every arm; a real model's replies mostly do match. The bench vocabulary merges only
# letters, digits and space, so a reply of punctuation comes back as the same tokens.
REPLY_GRAMMAR = "root ::= [!-/:-@[-`{-~]+"


def words(rng: random.Random, count: int) -> str:
    return " ".join(
        "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(count)
    )


# -- the client ------------------------------------------------------------------------------


async def chat(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], tokens: int, due: float
) -> Outcome:
    """One streamed chat completion sent at ``due`` (perf_counter), measured from then."""
    delay = due - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {
        "messages": messages,
        "max_tokens": tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
        "grammar": REPLY_GRAMMAR,
    }
    outcome = Outcome(status=0, sent=due)
    pieces: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as response:
            outcome.status = response.status_code
            queued = response.headers.get("x-paddler-queue-ms")
            outcome.queued_ms = float(queued) if queued is not None else None
            outcome.upstream = response.headers.get("x-paddler-upstream", "")
            outcome.cache_expected = response.headers.get("x-paddler-cache", "")
            outcome.slot = response.headers.get("x-paddler-slot", "")
            if response.status_code != 200:
                await response.aread()
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    timings = event.get("timings")
                    if timings:
                        outcome.prompt_n = int(timings.get("prompt_n", 0))
                        outcome.cache_n = int(timings.get("cache_n", 0))
                        outcome.tokens = int(timings.get("predicted_n", 0))
                    for choice in event.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if outcome.ttft is None:
                                outcome.ttft = time.perf_counter() - due
                            pieces.append(piece)
    except httpx.HTTPError:
        outcome.status = outcome.status or 0
    outcome.total = time.perf_counter() - due
    outcome.text = "".join(pieces)
    return outcome


class Target:
    """Where requests go: one address (a proxy), or the servers in turn (direct)."""

    def __init__(self, ports: list[int]) -> None:
        self.urls = [f"http://127.0.0.1:{port}/v1/chat/completions" for port in ports]
        self.next = 0

    def url(self) -> str:
        url = self.urls[self.next % len(self.urls)]
        self.next += 1
        return url


async def w1_multi_turn(
    client: httpx.AsyncClient, target: Target, sizes: Sizes, rng: random.Random, start: float
) -> list[Outcome]:
    # One application's sessions: the same system prompt, then turns of their own.
    system = {"role": "system", "content": words(rng, sizes.session_system_words)}

    async def session(number: int, due: float, seed: float) -> list[Outcome]:
        own = random.Random(seed)
        messages: list[dict[str, str]] = [system]
        done = []
        for turn in range(sizes.turns):
            messages.append({"role": "user", "content": words(own, sizes.turn_words)})
            outcome = await chat(client, target.url(), messages, sizes.output_tokens, due)
            outcome.label = f"s{number}t{turn}"
            done.append(outcome)
            if outcome.status != 200:
                break
            messages.append({"role": "assistant", "content": outcome.text})
            due = time.perf_counter() + sizes.think
        return done

    dues = poisson(rng, start, sizes.session_rate, sizes.sessions)
    sessions = await asyncio.gather(
        *(session(number, due, rng.random()) for number, due in enumerate(dues))
    )
    return [outcome for one in sessions for outcome in one]


async def w2_shared_prefixes(
    client: httpx.AsyncClient, target: Target, sizes: Sizes, rng: random.Random, start: float
) -> list[Outcome]:
    systems = [words(rng, sizes.system_words) for _ in range(sizes.groups)]
    return await _system_and_question(
        client, target, sizes, rng, start, sizes.rate, sizes.requests, lambda: rng.choice(systems)
    )


async def w3_unique(
    client: httpx.AsyncClient, target: Target, sizes: Sizes, rng: random.Random, start: float
) -> list[Outcome]:
    return await _system_and_question(
        client,
        target,
        sizes,
        rng,
        start,
        sizes.unique_rate,
        sizes.unique_requests,
        lambda: words(rng, sizes.system_words),
    )


async def _system_and_question(
    client: httpx.AsyncClient,
    target: Target,
    sizes: Sizes,
    rng: random.Random,
    start: float,
    rate: float,
    requests: int,
    system: Callable[[], str],
) -> list[Outcome]:
    """``requests`` requests of a system prompt (from ``system``) and a short question of
    their own, ``rate`` per second."""
    jobs = []
    for due in poisson(rng, start, rate, requests):
        messages = [
            {"role": "system", "content": system()},
            {"role": "user", "content": words(rng, sizes.question_words)},
        ]
        jobs.append(chat(client, target.url(), messages, sizes.output_tokens, due))
    return list(await asyncio.gather(*jobs))


async def w4_bursts(
    client: httpx.AsyncClient, target: Target, sizes: Sizes, rng: random.Random, start: float
) -> list[Outcome]:
    jobs = []
    for burst in range(sizes.bursts):
        due = start + burst * sizes.burst_gap
        for _ in range(3 * SERVERS * SLOTS):
            messages = [{"role": "user", "content": words(rng, sizes.burst_words)}]
            jobs.append(chat(client, target.url(), messages, sizes.output_tokens, due))
    return list(await asyncio.gather(*jobs))


WORKLOAD_RUNNERS = {
    "W1": w1_multi_turn,
    "W2": w2_shared_prefixes,
    "W3": w3_unique,
    "W4": w4_bursts,
}


def poisson(rng: random.Random, start: float, rate: float, count: int) -> list[float]:
    dues, due = [], start
    for _ in range(count):
        dues.append(due)
        due += rng.expovariate(rate)
    return dues


async def deferred_watch(ports: list[int], cell: Cell, stop: asyncio.Event) -> None:
    """llama.cpp's requests_deferred on every server, every 50 ms: requests it holds back
    itself because all its slots are busy."""
    async with httpx.AsyncClient(timeout=2) as client:
        while not stop.is_set():
            for port in ports:
                try:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.HTTPError:
                    continue
                for line in text.splitlines():
                    if line.startswith("llamacpp:requests_deferred "):
                        cell.deferred_max = max(cell.deferred_max, int(float(line.split()[1])))
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


async def run_cell(workload: str, entry: list[int], servers: list[int], sizes: Sizes) -> Cell:
    cell = Cell()
    stop = asyncio.Event()
    watch = asyncio.create_task(deferred_watch(servers, cell, stop))
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        rng = random.Random(f"{workload}-7")
        start = time.perf_counter() + 0.2
        cell.outcomes = await WORKLOAD_RUNNERS[workload](client, Target(entry), sizes, rng, start)
        for outcome in cell.outcomes:
            outcome.sent -= start
        cell.seconds = time.perf_counter() - start
    stop.set()
    await watch
    return cell


# -- the fleet and the arms ------------------------------------------------------------------


def bench_model() -> Path:
    model = cache_root() / "models" / "bench-seed0.gguf"
    if not model.exists():
        print("writing the ~28M-parameter bench model (once)", file=sys.stderr)
        write_model(model, "bench", seed=0)
    return model


@contextmanager
def llama_servers(
    binary: Path, model: Path, work: Path, cache_ram: int | None = None
) -> Iterator[list[int]]:
    """Fresh llama-servers (cold caches), each pinned to a core of its own; ``cache_ram``:
    their host-memory prompt cache in MiB (llama.cpp's default when None)."""
    ports = [free_port() for _ in range(SERVERS)]
    cores = sorted(os.sched_getaffinity(0))
    with ExitStack() as stack:
        for index, port in enumerate(ports):
            core = cores[index % len(cores)]
            argv = [
                str(binary),
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--parallel",
                str(SLOTS),
                "--ctx-size",
                str(CONTEXT),
                "--threads",
                "1",
                "--threads-batch",
                "1",
                "--metrics",
                "--alias",
                "bench",
                *(("--cache-ram", str(cache_ram)) if cache_ram is not None else ()),
            ]
            stack.enter_context(
                process(
                    argv,
                    log=work / f"llama-server-{index}.log",
                    preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}),
                )
            )
        for port in ports:
            _wait_ready(port)
        yield ports


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"llama-server on {port} did not load its model")


PADDLERD_TOML = """
[paddlerd]
pidfile = "{work}/paddlerd.pid"

[balancer]
management_port = {management}
reverseproxy_port = {port}
workers = 2
slot_table = "{work}/slots"
debug_headers = true
routing_policy = "{policy}"
{settings}"""

AGENT_TOML = """
[[agent]]
name = "server-{index}"
local_llamacpp_port = {server}
balancers = ["127.0.0.1:{management}"]
"""


@contextmanager
def arm(name: str, servers: list[int], work: Path) -> Iterator[list[int]]:
    """Start one arm in front of ``servers``; the ports clients send to."""
    if name == "direct":
        yield servers
        return
    port = free_port()
    if name not in POLICIES:
        # A prompt can take many seconds to its first token: nothing cut off for that.
        argv = proxy_argv(name, servers, port, work, read_timeout=300)
    else:
        management = free_port()
        text = PADDLERD_TOML.format(
            work=work,
            management=management,
            port=port,
            policy=POLICIES[name],
            settings=SETTINGS.get(name, ""),
        )
        for index, server in enumerate(servers):
            text += AGENT_TOML.format(index=index, server=server, management=management)
        config = work / "paddler.toml"
        config.write_text(text)
        argv = [sys.executable, "-m", "paddler.supervisor.cli", "-c", str(config)]
    with process(argv, log=work / f"{name}.log", cwd=ROOT):
        if name in POLICIES:
            _wait_slots(port, SERVERS * SLOTS)
        else:
            wait_http(f"http://127.0.0.1:{port}/health")
        yield [port]


def _wait_slots(port: int, slots: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            if health.get("slots", {}).get("idle") == slots:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Paddler on {port} did not see {slots} idle slots")


# -- figures ---------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def figures(cell: Cell) -> dict[str, Any]:
    done = [o for o in cell.outcomes if o.status == 200 and o.ttft is not None]
    ttft = [o.ttft * 1000 for o in done if o.ttft is not None]
    total = [o.total * 1000 for o in done]
    prompt = sum(o.prompt_n + o.cache_n for o in done)
    errors: dict[str, int] = {}
    for outcome in cell.outcomes:
        if outcome.status != 200 or outcome.ttft is None:
            key = str(outcome.status) if outcome.status else "connection"
            errors[key] = errors.get(key, 0) + 1
    queued = [o.queued_ms for o in done if o.queued_ms is not None]
    return {
        "requests": len(cell.outcomes),
        "ttft_ms": {
            "p50": percentile(ttft, 0.5),
            "p90": percentile(ttft, 0.9),
            "p99": percentile(ttft, 0.99),
        },
        "total_ms": {"p50": percentile(total, 0.5), "p99": percentile(total, 0.99)},
        "output_tokens_per_s": sum(o.tokens for o in done) / cell.seconds if cell.seconds else 0,
        "errors": errors,
        "errors_5xx": sum(n for key, n in errors.items() if key.startswith("5")),
        "deferred_max": cell.deferred_max,
        "cache_share": sum(o.cache_n for o in done) / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "queue_wait_ms": (
            {"p50": percentile(queued, 0.5), "p90": percentile(queued, 0.9)} if queued else None
        ),
        # Every answer's, for the percentiles over all repetitions (tables(): POOLED).
        "ttft_values_ms": sorted(round(value, 1) for value in ttft),
    }


def run(
    sizes: Sizes,
    repetitions: int,
    workloads: tuple[str, ...],
    arms: tuple[str, ...],
    requests_log: Path | None = None,
    cache_ram: int | None = None,
) -> dict[str, Any]:
    ensure_tools()
    binary = ensure_llama_server()
    model = bench_model()
    results: dict[str, Any] = {name: {w: [] for w in workloads} for name in arms}
    with tempfile.TemporaryDirectory() as raw:
        work = Path(raw)
        for repetition in range(repetitions):
            # Every other repetition runs the arms in reverse: the machine's speed drifts
            # over minutes (a lone request's first token varied by 15 % between cells),
            # and an arm always run last would carry the drift alone.
            order = arms if repetition % 2 == 0 else tuple(reversed(arms))
            for workload in workloads:
                for name in order:
                    with (
                        llama_servers(binary, model, work, cache_ram) as servers,
                        arm(name, servers, work) as entry,
                    ):
                        cell = asyncio.run(run_cell(workload, entry, servers, sizes))
                    measured = figures(cell)
                    if requests_log is not None:
                        _log_requests(requests_log, repetition, workload, name, cell)
                    results[name][workload].append(measured)
                    print(
                        f"rep {repetition + 1} {workload} {name:18} ttft p50/p90 "
                        f"{measured['ttft_ms']['p50']:.0f}/{measured['ttft_ms']['p90']:.0f} ms  "
                        f"cache {measured['cache_share']:.0%}  deferred "
                        f"{measured['deferred_max']}  errors {measured['errors']}",
                        file=sys.stderr,
                    )
                    if measured["errors"]:
                        _report_trouble(name, work)
    return results


def _log_requests(path: Path, repetition: int, workload: str, arm: str, cell: Cell) -> None:
    """Every request of the cell, one JSON line each: where a figure came from."""
    with path.open("a") as out:
        for outcome in sorted(cell.outcomes, key=lambda o: o.sent):
            record = {"rep": repetition + 1, "workload": workload, "arm": arm}
            record.update((key, value) for key, value in vars(outcome).items() if key != "text")
            out.write(json.dumps(record) + "\n")


def _report_trouble(name: str, work: Path) -> None:
    """The arm's warnings and errors: why a request failed is there, not in the log's
    tail (which is the arm's stop)."""
    log = work / f"{name}.log"
    if log.exists():
        lines = log.read_text(errors="replace").splitlines()
        trouble = [line for line in lines if "WARNING" in line or "ERROR" in line]
        print(f"{name}: errors; its log's warnings and errors:", file=sys.stderr)
        for line in trouble[-15:]:
            print(f"  {line}", file=sys.stderr)


TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("time to first token p50 (ms)", ("ttft_ms", "p50"), "{:.0f}"),
    ("time to first token p90 (ms)", ("ttft_ms", "p90"), "{:.0f}"),
    ("time to first token p99 (ms)", ("ttft_ms", "p99"), "{:.0f}"),
    ("end to end p50 (ms)", ("total_ms", "p50"), "{:.0f}"),
    ("end to end p99 (ms)", ("total_ms", "p99"), "{:.0f}"),
    ("output tokens/s", ("output_tokens_per_s",), "{:.1f}"),
    ("prompt tokens from cache", ("cache_share",), "{:.0%}"),
    ("most requests deferred in llama.cpp", ("deferred_max",), "{:.0f}"),
    ("5xx", ("errors_5xx",), "{:.0f}"),
    ("Paddler's queue wait p90 (ms)", ("queue_wait_ms", "p90"), "{:.0f}"),
)

# Percentiles over every repetition's requests together. A cell has few requests (W1 36,
# W2 72, W3 24), and its p90 lies where the slowest few end: in bench W2 with the 8 GiB
# cache, least_busy's per-repetition p90 was 381 ms in two repetitions and 1,820 ms in
# the third, as 7 or 8 of its 72 requests processed their whole prompt. The median of
# three such p90s says which side of that edge two repetitions fell on; the p90 of all
# 216 requests says how slow the slowest tenth was.
POOLED: tuple[tuple[str, float], ...] = (
    ("time to first token p50, all repetitions (ms)", 0.5),
    ("time to first token p90, all repetitions (ms)", 0.9),
)

TITLES = {
    "W1": "W1 multi-turn chat",
    "W2": "W2 shared system prompts",
    "W3": "W3 unique prompts",
    "W4": "W4 bursts of 3x the slots",
}


def _pick(measured: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = measured
    for key in path:
        if value is None:
            return None
        value = value[key]
    return None if value is None else float(value)


def _row(
    label: str,
    shown: dict[str, str],
    values: dict[str, float],
    arms: tuple[str, ...],
    ratios: list[tuple[str, str]],
    compared: dict[str, dict[str, float | None]],
) -> str:
    """A row of a workload's table: each arm's figure as shown, then the ratios of its
    ``values``, which also go to ``compared``."""
    ratio_cells = []
    for a, b in ratios:
        ratio = values[a] / values[b] if values.get(b) and a in values else None
        compared.setdefault(f"{a} / {b}", {})[label] = ratio
        ratio_cells.append(f"{ratio:.2f}" if ratio is not None else "-")
    cells = [shown.get(name, "-") for name in arms]
    return f"| {label} | " + " | ".join(cells + ratio_cells) + " |"


def tables(
    results: dict[str, Any], workloads: tuple[str, ...], arms: tuple[str, ...]
) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    compared: dict[str, Any] = {}
    ratios = [(a, b) for a, b in RATIOS if a in arms and b in arms]
    for workload in workloads:
        lines += [
            f"### {TITLES[workload]}",
            "",
            "| figure | " + " | ".join(arms) + "".join(f" | {a} / {b}" for a, b in ratios) + " |",
            "|" + " --- |" * (len(arms) + len(ratios) + 1),
        ]
        compared[workload] = {}
        ratios_of = compared[workload]
        for label, share in POOLED:
            pooled: dict[str, float] = {}
            for name in arms:
                values = [v for m in results[name][workload] for v in m.get("ttft_values_ms", ())]
                if values:
                    pooled[name] = percentile(values, share)
            rounded = {name: f"{value:.0f}" for name, value in pooled.items()}
            lines.append(_row(label, rounded, pooled, arms, ratios, ratios_of))
        for label, path, form in TABLE:
            medians: dict[str, float] = {}
            shown: dict[str, str] = {}
            for name in arms:
                values = [v for m in results[name][workload] if (v := _pick(m, path)) is not None]
                if not values:
                    continue
                medians[name] = statistics.median(values)
                low, high = min(values), max(values)
                spread = f" ({form.format(low)}-{form.format(high)})" if low != high else ""
                shown[name] = form.format(medians[name]) + spread
            lines.append(_row(label, shown, medians, arms, ratios, ratios_of))
        lines.append("")
    return "\n".join(lines), compared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 repetition of small workloads")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--arms",
        help="a subset of: " + ",".join(ARMS) + " (default: all; --smoke: all but paddler-cache, "
        "to stay within 5 minutes)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--stem", default="fleet_quality", help="the results files' name")
    parser.add_argument(
        "--cache-ram",
        type=int,
        help="llama-server's host-memory prompt cache, MiB (default: llama.cpp's, 8192): the "
        "bench model's KV takes 16 KB a token, so the default holds every prompt of every "
        "workload, as no production cache does",
    )
    parser.add_argument(
        "--rate", type=float, help=f"W2's requests per second (default {FULL.rate})"
    )
    parser.add_argument(
        "--unique-rate", type=float, help=f"W3's requests per second (default {FULL.unique_rate})"
    )
    parser.add_argument(
        "--requests-log",
        type=Path,
        help="append every request (arm, upstream, cache guess, cache_n, TTFT) as JSON lines",
    )
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    sizes = SMOKE if args.smoke else FULL
    if args.rate is not None:
        sizes = replace(sizes, rate=args.rate)
    if args.unique_rate is not None:
        sizes = replace(sizes, unique_rate=args.unique_rate)
    repetitions = 1 if args.smoke else args.repetitions
    workloads = tuple(args.workloads.split(","))
    default = [
        name
        for name in ARMS
        if name not in ON_REQUEST and not (args.smoke and name == "paddler-cache")
    ]
    arms = tuple(args.arms.split(",")) if args.arms else tuple(default)
    unknown = sorted(set(arms) - set(ARMS)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown arms or workloads: {', '.join(unknown)}")
    began = time.monotonic()
    results = run(sizes, repetitions, workloads, arms, args.requests_log, args.cache_ram)
    table, compared = tables(results, workloads, arms)
    print(table)
    if not args.smoke:
        meta = {
            **machine(),
            "llama_server": str(ensure_llama_server(log=False)),
            "sizes": sizes.__dict__,
            "cache_ram_mib": args.cache_ram,
            "repetitions": repetitions,
            "minutes": round((time.monotonic() - began) / 60, 1),
        }
        write_results(
            args.out,
            args.stem,
            "Fleet quality",
            {"meta": meta, "results": results, "ratios": compared},
            f"{repetitions} repetitions (arms in reverse order every other one); 'all "
            "repetitions': the percentile over every repetition's requests together; "
            "else the median of the repetitions', and min-max where they differ; "
            f"{meta['minutes']} minutes. 2 llama-servers x 2 slots, the generated "
            f"~28M-parameter model, one core each"
            + (
                f", a host-memory prompt cache of {args.cache_ram} MiB"
                if args.cache_ram is not None
                else ""
            )
            + f".\n\n{table}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
