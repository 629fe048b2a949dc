"""StatsD: the fleet's gauges and this process's request counters, sent over UDP.

Gauge names are the original Paddler's (``paddler.requests_buffered`` is the queue
depth, ``paddler.slots_idle``, ``paddler.slots_processing``) and a few more. Every
worker sends the gauges, which it reads from the shared slot table (the same values:
a gauge keeps the last), and the counts of its own requests since its last send (StatsD
adds counters up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from paddler.metrics.counters import CounterFile
from paddler.metrics.exposition import FleetSnapshot
from paddler.metrics.families import (
    EJECTIONS,
    HOLDER_WAITS,
    PROMPT_TOKENS,
    QUEUE_REJECTIONS,
    QUEUE_TIMEOUTS,
    REQUESTS,
    RETRIES,
)

log = logging.getLogger("paddler.balancer")

# StatsD counter name -> the families (and, for requests, the statuses) it adds up.
COUNTED = {
    "requests": REQUESTS.name,
    "queue_timeouts": QUEUE_TIMEOUTS.name,
    "queue_rejections": QUEUE_REJECTIONS.name,
    "retries": RETRIES.name,
    "ejections": EJECTIONS.name,
    "cache_holder_waits": HOLDER_WAITS.name,
}
# StatsD counter name -> the source label of paddler_prompt_tokens_total it adds up:
# cached / (cached + processed) is the share of prompt tokens served from cache.
PROMPT_SOURCES = {"prompt_tokens_cached": "cache", "prompt_tokens_processed": "processed"}


def gauges(fleet: FleetSnapshot) -> dict[str, float]:
    serving = [row for row in fleet.rows if fleet.states[row.index] == "ready"]
    return {
        "requests_buffered": fleet.queued,
        "slots_idle": sum(row.free_slots for row in serving),
        "slots_processing": sum(row.slots_total - row.free_slots for row in serving),
        "slots_total": sum(row.slots_total for row in serving),
        "upstreams": len(serving),
        "upstreams_desired": fleet.demand.desired_upstreams,
        "slots_utilization": fleet.demand.utilization,
        "queue_oldest_wait_ms": round(fleet.oldest_wait * 1000),
    } | _learned(fleet)


def _learned(fleet: FleetSnapshot) -> dict[str, float]:
    learned = fleet.learned
    if learned is None:
        return {}
    return {"cache_copy_trust": learned.copy_trust, "cache_host_trust": learned.host_trust}


def counts(values: dict[str, float]) -> dict[str, float]:
    """This process's totals per StatsD counter (requests failed: status 5xx)."""
    totals = dict.fromkeys([*COUNTED, "requests_failed", *PROMPT_SOURCES], 0.0)
    for key, value in values.items():
        family = key.split("{", 1)[0]
        for name, counted in COUNTED.items():
            if family == counted:
                totals[name] += value
        if family == REQUESTS.name and 'status="5' in key:
            totals["requests_failed"] += value
        if family == PROMPT_TOKENS.name:
            for name, source in PROMPT_SOURCES.items():
                if f'source="{source}"' in key:
                    totals[name] += value
    return totals


def packet(prefix: str, fleet: FleetSnapshot, deltas: dict[str, float]) -> bytes:
    lines = [f"{prefix}.{name}:{value:g}|g" for name, value in gauges(fleet).items()]
    lines += [f"{prefix}.{name}:{value:g}|c" for name, value in deltas.items() if value]
    return "\n".join(lines).encode()


class _Quiet(asyncio.DatagramProtocol):
    """Nobody listening (ICMP port unreachable) is logged once, not at every send."""

    def __init__(self) -> None:
        self.warned = False

    def error_received(self, exc: Exception) -> None:
        if not self.warned:
            log.warning("StatsD: %s (sending goes on)", exc)
            self.warned = True


class StatsdSender:
    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        interval: float,
        snapshot: Callable[[], FleetSnapshot],
        counters: CounterFile,
    ) -> None:
        self.host, self.port = host, port
        self.prefix = prefix
        self.interval = interval
        self.snapshot = snapshot
        self.counters = counters
        self._sent = counts({})

    def next_packet(self) -> bytes:
        now = counts(self.counters.values)
        deltas = {name: now[name] - self._sent[name] for name in now}
        self._sent = now
        return packet(self.prefix, self.snapshot(), deltas)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        transport: asyncio.DatagramTransport | None = None
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    if transport is None:
                        # Resolved here, not at start: a StatsD host whose name does
                        # not resolve yet delays the metrics, not the balancer.
                        transport, _ = await loop.create_datagram_endpoint(
                            _Quiet, remote_addr=(self.host, self.port)
                        )
                    transport.sendto(self.next_packet())
                except OSError as error:
                    log.warning("StatsD %s:%d: %s; trying again", self.host, self.port, error)
                except Exception:
                    log.exception("StatsD: the send failed; trying again next time")
        finally:
            if transport is not None:
                transport.close()
