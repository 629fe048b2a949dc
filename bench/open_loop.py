"""Open-loop load: requests sent on a fixed schedule, whether or not earlier ones answered.

    python bench/open_loop.py --rate 500 --seconds 10 --seed 1 --body '{...}' HOST:PORT [...]

Arrivals follow a Poisson process drawn from the seed, so every arm of a benchmark gets
the same schedule. A request's latency runs from the moment the schedule said to send it,
not from when it went out: a slow answer cannot hide the queue behind it (closed-loop
tools like wrk wait for an answer before the next request and so under-report it).
Requests go round robin over the addresses given, on kept-alive connections opened as
needed, over Paddler's own HTTP/1.1 connections (the generator's CPU is not counted by
the benchmark, only the proxy's). Prints one JSON object: count, errors, latency
percentiles in ms, and how late the generator itself ran (its own limit).
"""

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paddler.balancer.proxy.connections import ConnectionPool, request_bytes


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def one(
    pool: ConnectionPool, address: str, request: bytes, due: float, timeout: float
) -> tuple[float, float, int]:
    """Latency to the first body byte and to the end, from ``due``; and the status."""
    connection = pool.idle(address) or await pool.connect(address)
    answer = connection.send(request, False)
    first = 0.0
    try:
        await answer.head(timeout)
        while (chunk := await answer.body(timeout)) is not None:
            if not first and chunk:
                first = time.perf_counter()
        end = time.perf_counter()
        return (first or end) - due, end - due, answer.status
    finally:
        connection.finished(answer)


async def run(
    addresses: list[str], body: bytes, rate: float, seconds: float, seed: int
) -> dict[str, object]:
    pool = ConnectionPool(connect_timeout=5.0, keepalive_timeout=30.0)
    schedule = random.Random(seed)
    request = {
        address: request_bytes(
            "POST",
            "/v1/chat/completions",
            [(b"host", address.encode()), (b"content-type", b"application/json")],
            body,
        )
        for address in addresses
    }
    tasks: list[asyncio.Task[tuple[float, float, int]]] = []
    lateness: list[float] = []
    # The first second warms the connections up and is not counted.
    warm = time.perf_counter() + 0.05
    start = warm + 1.0
    due = warm
    index = 0
    counted = 0
    while due < start + seconds:
        if due >= start and not counted:
            counted = len(tasks)
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        lateness.append(time.perf_counter() - due)
        address = addresses[index % len(addresses)]
        tasks.append(asyncio.create_task(one(pool, address, request[address], due, 60.0)))
        index += 1
        due += schedule.expovariate(rate)
    results = (await asyncio.gather(*tasks, return_exceptions=True))[counted:]
    lateness = lateness[counted:]
    pool.close()
    # What went wrong, by kind: a cell whose every request failed says why in the results.
    failures = Counter(
        repr(result)[:160] if not isinstance(result, tuple) else f"answered {result[2]}"
        for result in results
        if not isinstance(result, tuple) or result[2] != 200
    )
    first = [r[0] * 1000 for r in results if isinstance(r, tuple) and r[2] == 200]
    whole = [r[1] * 1000 for r in results if isinstance(r, tuple) and r[2] == 200]
    return {
        "rate": rate,
        "seconds": seconds,
        "count": len(results),
        "errors": len(results) - len(whole),
        "failures": dict(failures.most_common(5)),
        "first_byte_ms": {
            "p50": percentile(first, 0.50),
            "p99": percentile(first, 0.99),
            "p999": percentile(first, 0.999),
        },
        "latency_ms": {
            "p50": percentile(whole, 0.50),
            "p99": percentile(whole, 0.99),
            "p999": percentile(whole, 0.999),
        },
        "generator_late_ms_p99": percentile(lateness, 0.99) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("addresses", nargs="+", help="HOST:PORT, requests go round robin")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--body", required=True)
    args = parser.parse_args()
    gc.disable()  # a collection mid-run would show up as the proxy's latency
    result = uvloop.run(run(args.addresses, args.body.encode(), args.rate, args.seconds, args.seed))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
