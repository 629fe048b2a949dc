"""One span per proxied request, batched and sent to an OTLP/HTTP collector.

The request path only appends a finished span's fields to a list; a task in each
worker encodes what gathered (ExportTraceServiceRequest, opentelemetry-proto's
trace/v1) and POSTs it every second, or sooner when a batch is full. A collector that
is down loses spans, never requests: the list is bounded, and what it cannot hold is
counted and logged.
"""

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from dataclasses import dataclass

import httpx

from paddler.tracing import protobuf as pb

log = logging.getLogger("paddler.balancer")

BATCH = 512
MAX_PENDING = 8192
EXPORT_INTERVAL = 1.0
SPAN_KIND_SERVER = 2
STATUS_ERROR = 2
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

Attribute = str | int | float | bool


@dataclass(slots=True)
class Span:
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Attribute]
    error: str = ""  # set for an answer the client got as a failure (5xx)


def new_span_id() -> bytes:
    return os.urandom(8)


def trace_context(traceparent: bytes | None) -> tuple[bytes, bytes]:
    """(trace id, parent span id) from a W3C traceparent header, or a new trace."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.decode("latin-1").strip().lower())
        if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
            return bytes.fromhex(match.group(1)), bytes.fromhex(match.group(2))
    return os.urandom(16), b""


def traceparent(trace_id: bytes, span_id: bytes) -> bytes:
    """The header that makes the upstream's work part of the same trace."""
    return b"00-%s-%s-01" % (trace_id.hex().encode(), span_id.hex().encode())


def _value(value: Attribute) -> bytes:
    if isinstance(value, bool):
        return pb.uint(2, int(value))
    if isinstance(value, int):
        return pb.uint(3, value)
    if isinstance(value, float):
        return pb.double(4, value)
    return pb.string(1, value)


def _key_value(key: str, value: Attribute) -> bytes:
    return pb.string(1, key) + pb.message(2, _value(value))


def encode_span(span: Span) -> bytes:
    body = pb.message(1, span.trace_id) + pb.message(2, span.span_id)
    if span.parent_id:
        body += pb.message(4, span.parent_id)
    body += pb.string(5, span.name) + pb.uint(6, SPAN_KIND_SERVER)
    body += pb.fixed64(7, span.start_ns) + pb.fixed64(8, span.end_ns)
    for key, value in span.attributes.items():
        body += pb.message(9, _key_value(key, value))
    if span.error:
        body += pb.message(15, pb.string(2, span.error) + pb.uint(3, STATUS_ERROR))
    return body


def encode_request(spans: list[Span], resource: dict[str, Attribute], version: str) -> bytes:
    """An ExportTraceServiceRequest with one resource and one instrumentation scope."""
    resource_message = b"".join(pb.message(1, _key_value(k, v)) for k, v in resource.items())
    scope = pb.string(1, "paddler") + pb.string(2, version)
    scope_spans = pb.message(1, scope) + b"".join(pb.message(2, encode_span(s)) for s in spans)
    resource_spans = pb.message(1, resource_message) + pb.message(2, scope_spans)
    return pb.message(1, resource_spans)


class Exporter:
    """Gathers this worker's spans and sends them in batches."""

    def __init__(self, endpoint: str, service_name: str, version: str) -> None:
        self.endpoint = endpoint
        self.version = version
        self.resource: dict[str, Attribute] = {
            "service.name": service_name,
            "service.version": version,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
        self.pending: list[Span] = []
        self.dropped = 0
        self._wake = asyncio.Event()
        self._failing = False

    def add(self, span: Span) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(span)
        if len(self.pending) >= BATCH:
            self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), EXPORT_INTERVAL)
                    self._wake.clear()
                    await self.flush(client)
            finally:
                # A worker that stops sends what it still holds (SIGTERM's grace).
                await asyncio.shield(self.flush(client))

    async def flush(self, client: httpx.AsyncClient) -> None:
        while self.pending:
            batch, self.pending = self.pending[:BATCH], self.pending[BATCH:]
            body = encode_request(batch, self.resource, self.version)
            try:
                answer = await client.post(
                    self.endpoint,
                    content=body,
                    headers={"Content-Type": "application/x-protobuf"},
                )
                answer.raise_for_status()
            except httpx.HTTPError as error:
                if not self._failing:
                    log.warning(
                        "OTLP %s: %s; %d span(s) lost (said once until it works again)",
                        self.endpoint,
                        error,
                        len(batch),
                    )
                self._failing = True
                return  # the rest waits for the next round
            if self._failing:
                log.info("OTLP %s: sending again", self.endpoint)
                self._failing = False
            if self.dropped:
                log.warning("OTLP: %d span(s) dropped while the collector was behind", self.dropped)
                self.dropped = 0


def now_ns() -> int:
    return time.time_ns()
