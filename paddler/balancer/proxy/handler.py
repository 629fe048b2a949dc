"""The proxy's request flow: classify, find a slot (or wait for one), forward, release."""

import asyncio
import hmac
import itertools
import json
import json.scanner
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from paddler.balancer.fleet import Fleet
from paddler.balancer.proxy.affinity import Affinity, Plan
from paddler.balancer.proxy.connections import ConnectionPool
from paddler.balancer.proxy.http import Exchange, error_payload
from paddler.balancer.proxy.routing import ModelLines, eligible, fleet_models
from paddler.balancer.proxy.timings import prompt_timings
from paddler.balancer.proxy.upstream import (
    RetryableError,
    UpstreamFailedError,
    forward,
    request_headers,
)
from paddler.balancer.proxy.waiting import (
    Eligible,
    QueueFullError,
    QueueTimeoutError,
    SlotWaiter,
)
from paddler.config.model import names_slots, slot_contents_path
from paddler.metrics.recorder import Recorder
from paddler.prefixes.slots import SlotContents
from paddler.slots import SlotTable, UpstreamRow, UpstreamState
from paddler.slots.policy import Policy, model_names
from paddler.tracing.otlp import Exporter, Span, new_span_id, trace_context, traceparent

log = logging.getLogger("paddler.balancer")

HIDDEN_ENDPOINTS: Final = ("/slots", "/metrics")
# Routes the metrics name as they are; any other path counts as "other", so that clients
# cannot grow the metrics without bound by inventing paths.
KNOWN_ROUTES: Final = frozenset(
    (
        "/health",
        "/v1/models",
        "/models",
        "/props",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/slots",
        "/metrics",
        "/v1/health",
    )
)
# Where llama.cpp reads a request's id_slot: its completion routes (the chat ones included).
# Requests elsewhere let llama.cpp choose.
SLOT_NAMING_ROUTES: Final = frozenset(
    (
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/infill",
    )
)
CLIENT_LEFT: Final = 499  # nginx's status for a client that closed before its answer ended


class Proxy:
    # What startup() makes in the worker, after the fork. Plain attributes rather than
    # properties that check for it: the request path reads them a dozen times.
    table: SlotTable
    pool: ConnectionPool
    recorder: Recorder
    affinity: Affinity
    lines: ModelLines
    waiter: SlotWaiter

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.settings = fleet.settings
        self.slot_endpoints = frozenset(self.settings.slot_endpoints)
        self.exposed = tuple(self.settings.exposed_endpoints)
        self.api_keys = [key.encode() for key in self.settings.api_keys]
        self._started = False
        self._failures: dict[tuple[int, int], int] = {}
        self._request_ids: Iterator[str] = iter(())
        self._routes = self.slot_endpoints | KNOWN_ROUTES
        self._tracer: Exporter | None = None

    async def startup(self, recorder: Recorder, tracer: Exporter | None = None) -> None:
        self.recorder = recorder
        self._tracer = tracer
        self.table = self.fleet.table
        index = self.fleet.index  # (the fleet's: one mapping per worker)
        contents = None
        if names_slots(self.settings):
            contents = SlotContents.open(Path(slot_contents_path(self.settings)))
        self.affinity = Affinity(self.settings, self.table, index, recorder, contents)
        self.pool = ConnectionPool(
            self.settings.upstream_connect_timeout, self.settings.upstream_keepalive_timeout
        )
        self.waiter = SlotWaiter(self.table)
        self.lines = ModelLines(self.table)
        self.waiter.start()
        self._started = True
        # Unique across workers and restarts by a random part drawn once per worker
        # process (startup runs after the fork), then a counter: no syscall per request.
        self._request_ids = map((os.urandom(6).hex() + "{:06x}").format, itertools.count())

    async def shutdown(self) -> None:
        if self._started:
            await self.waiter.stop()
            self.pool.close()

    # -- entry -----------------------------------------------------------------------------

    async def handle(self, exchange: Exchange) -> None:
        """Answer one whole client request; the connection it came on does the rest."""
        started = time.monotonic()
        given = exchange.header(b"x-request-id")
        exchange.request_id = given.decode("latin-1") if given else next(self._request_ids)
        trace: tuple[bytes, bytes, bytes, int] | None = None
        if self._tracer is not None:
            trace_id, parent_id = trace_context(exchange.header(b"traceparent"))
            trace = (trace_id, new_span_id(), parent_id, time.time_ns())
            exchange.trace = trace[:2]
        try:
            await self._handle(exchange)
        except asyncio.CancelledError:
            if not exchange.client_left:
                raise
            log.info("[%s] the client left; its request was stopped", exchange.request_id)
        except ConnectionError:
            log.info("[%s] the client left while its answer was sent", exchange.request_id)
        finally:
            self._count(exchange, started, trace)

    def _count(
        self, exchange: Exchange, started: float, trace: tuple[bytes, bytes, bytes, int] | None
    ) -> None:
        path = exchange.path
        route = path if path in self._routes else "other"
        if exchange.client_left and not exchange.response_complete:
            status = CLIENT_LEFT
        else:
            status = exchange.status or 500
        first_token = None
        if exchange.event_stream and exchange.first_byte_at and exchange.upstream != "none":
            first_token = exchange.first_byte_at - started
        duration = time.monotonic() - started
        self.recorder.request(route, status, exchange.upstream, duration, first_token)
        if trace is not None and self._tracer is not None:
            self._tracer.add(self._span(exchange, route, status, duration, first_token, trace))

    def _span(
        self,
        exchange: Exchange,
        route: str,
        status: int,
        duration: float,
        first_token: float | None,
        trace: tuple[bytes, bytes, bytes, int],
    ) -> Span:
        trace_id, span_id, parent_id, start_ns = trace
        attributes: dict[str, str | int | float | bool] = {
            "http.request.method": exchange.method,
            "url.path": route,
            "http.response.status_code": status,
            "paddler.request_id": exchange.request_id,
            "paddler.upstream": exchange.upstream,
            "paddler.queue_wait_ms": round(exchange.queued * 1000, 3),
            "paddler.retries": max(0, exchange.attempts - 1),
        }
        if first_token is not None:
            attributes["paddler.time_to_first_token_ms"] = round(first_token * 1000, 3)
        return Span(
            trace_id,
            span_id,
            parent_id,
            f"{exchange.method} {route}",
            start_ns,
            start_ns + int(duration * 1e9),
            attributes,
            f"answered {status}" if status >= 500 else "",
        )

    async def _handle(self, exchange: Exchange) -> None:
        method, path, body = exchange.method, exchange.path, exchange.body
        if method == "GET" and path == "/health":
            await exchange.respond(200, self.fleet_health())
            return
        if self.api_keys and not self._authorized(exchange.headers):
            await _fail(
                exchange,
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
                "authentication_error",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if method == "GET" and path in ("/v1/models", "/models"):
            await exchange.respond(200, self.models())
            return
        if path.startswith(HIDDEN_ENDPOINTS) and not path.startswith(self.exposed):
            await _fail(
                exchange,
                404,
                f"{path} is not exposed by this balancer (see balancer.exposed_endpoints)",
                "not_found_error",
            )
            return
        takes_slot = method == "POST" and path in self.slot_endpoints
        model: str | None = None
        payload: Any = None
        content_type = exchange.header(b"content-type") or b""
        if body and (takes_slot or content_type.startswith(b"application/json")):
            try:
                # JSON between systems is UTF-8 (RFC 8259 8.1); decoding first spares
                # json its guess at the encoding.
                payload = parse_json(body.decode())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                await _fail(
                    exchange,
                    400,
                    f"the request body is not valid JSON: {error}",
                    "invalid_request_error",
                )
                return
            named = payload.get("model") if isinstance(payload, dict) else None
            model = named if isinstance(named, str) and named else None
        line = 0  # any model's
        if model is not None:
            known = self.lines.key(model)
            if known is None:
                served = fleet_models(self.fleet.table.rows())
                await _fail(
                    exchange,
                    404,
                    f"model {model!r} is not served here; the models are: "
                    f"{', '.join(served) or 'none yet'}",
                    "not_found_error",
                )
                return
            line = known
        if takes_slot:
            await self._with_slot(exchange, body, model, line, payload)
        else:
            await self._without_slot(exchange, body, model)

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        given = b""
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and not given:
                given = value.strip()
        # Compare with every key, in constant time, so timing tells nothing about them.
        matches = [hmac.compare_digest(given, key) for key in self.api_keys]
        return any(matches)

    # -- requests that take a slot ---------------------------------------------------------

    async def _with_slot(
        self,
        exchange: Exchange,
        body: bytes,
        model: str | None,
        line: int,
        payload: Any,
    ) -> None:
        settings = self.settings
        affinity = self.affinity
        session = exchange.header(affinity.session_header) if affinity.remembers else None
        plan = affinity.plan(session, payload)
        deadline = time.monotonic() + settings.request_buffer_timeout
        queued = 0.0
        if plan.waits:  # cache_aware: its prefix is cached only where a slot is in use
            plan, queued = await self._wait_for_holder(plan)
        names_slot = affinity.pins and may_name_slot(exchange.path, payload)
        tried: set[tuple[int, int]] = set()
        last_error = ""
        retries = _Retries(settings.max_retries)
        queued_counted = False  # a request's first wait is its queue wait; retries wait too
        while retries.left():
            choose = self._policy(model, frozenset(tried), plan)
            if last_error and not choose()(self.table.rows()):
                break  # nowhere else to try: say what went wrong instead of waiting
            asked = time.monotonic()
            try:
                reservation, row = self.waiter.take(line, choose()) or await self.waiter.wait(
                    line, choose, max(0.0, deadline - time.monotonic()), partial=bool(tried)
                )
            except QueueFullError:
                await self._queue_full(exchange)
                return
            except QueueTimeoutError:
                if last_error:
                    break  # time ran out retrying: the upstream's failure is the news
                await self._queue_timed_out(exchange)
                return
            if not queued_counted:  # with the wait for a busy holder, as the header has it
                self.recorder.queue_wait(queued + time.monotonic() - asked)
                queued_counted = True
            queued += time.monotonic() - asked
            exchange.queued = queued
            # (What only the remembering policies need is guarded here: least_busy's
            # requests make none of those calls.)
            expected = False
            occupied: list[int] = []
            if affinity.remembers:
                expected = self._remember_when_answered(exchange, plan, row, occupied, payload)
            sent = self._naming_slot(exchange, plan, row, body) if names_slot else body
            try:
                await self._forward_timed(exchange, row, sent, queued, plan, expected)
                return
            except RetryableError as error:
                last_error = self._note_failure(exchange, row, error, tried)
            finally:
                self.table.release(reservation)
                self.waiter.released()
                if occupied or exchange.slot >= 0:
                    self._ended_on(row, occupied, exchange.slot)
        await _fail(
            exchange,
            502,
            f"no upstream could take the request; last: {last_error}",
            "upstream_error",
        )

    async def _forward_timed(
        self,
        exchange: Exchange,
        row: UpstreamRow,
        body: bytes,
        queued: float,
        plan: Plan,
        expected: bool,
    ) -> None:
        """_forward(), then what llama.cpp's timings at the end of the answer say: its
        prompt tokens counted (every policy), and learned from under cache_aware."""
        exchange.timings = b""
        await self._forward(exchange, row, body, queued)
        if not exchange.timings:
            return
        prompt = prompt_timings(exchange.timings)
        if prompt is None:
            return
        self.recorder.prompt_tokens(row.name, prompt.cached, prompt.processed)
        if self.affinity.watches_timings:
            self.affinity.learn(plan, expected, row, prompt, exchange.from_host_cache)
        if exchange.slot >= 0:
            self.affinity.measured(row, exchange.slot, prompt)

    def _naming_slot(self, exchange: Exchange, plan: Plan, row: UpstreamRow, body: bytes) -> bytes:
        """The body to send to ``row``: naming the llama.cpp slot the request takes there,
        if the slot record says to. (exchange.slot: the slot recorded, named or not.)"""
        hosted: list[bool] = []
        slot, named = self.affinity.pin(plan, row, hosted)
        exchange.slot = slot
        exchange.slot_named = named
        exchange.from_host_cache = bool(hosted) and hosted[0]
        self.recorder.slot_naming("off" if slot < 0 else "named" if named else "unnamed")
        return naming(body, slot) if named else body

    def _ended_on(self, row: UpstreamRow, occupied: list[int], slot: int) -> None:
        """A request that counted as holding ``occupied`` prefixes on ``row``, or that
        named its ``slot`` there, ended."""
        if occupied:
            self.affinity.vacate(occupied, row)
        if slot >= 0:
            self.affinity.unpin(row, slot)

    async def _wait_for_holder(self, plan: Plan) -> tuple[Plan, float]:
        """The plan after waiting for a busy holder of its prefix; the seconds waited."""
        asked = time.monotonic()
        plan = await self.affinity.wait_for_holder(plan)
        return plan, time.monotonic() - asked

    def _remember_when_answered(
        self,
        exchange: Exchange,
        plan: Plan,
        row: UpstreamRow,
        occupied: list[int],
        payload: Any,
    ) -> bool:
        """Have the request's prefixes remembered on ``row`` once its answer begins;
        whether a cache hit is expected there."""
        affinity = self.affinity
        expected = affinity.expects(plan, row)
        exchange.cache_expected = "hit" if expected else "miss"
        early = 0
        if (
            affinity.watches_timings
            and expected
            and isinstance(payload, dict)
            and payload.get("stream") is True
        ):
            early = affinity.occupy_held(plan, row, occupied)
        exchange.on_first_byte = _RememberWhenAnswered(affinity, plan, row, occupied, early)
        return expected

    async def _queue_full(self, exchange: Exchange) -> None:
        self.recorder.queue_rejected()
        retry_after = max(1, round(self.settings.request_buffer_timeout / 4))
        await _fail(
            exchange,
            503,
            "every slot is busy and the request buffer is full; retry later",
            "overloaded_error",
            [(b"retry-after", str(retry_after).encode())],
        )

    async def _queue_timed_out(self, exchange: Exchange) -> None:
        self.recorder.queue_timed_out()
        await _fail(
            exchange,
            504,
            f"no slot became free within {self.settings.request_buffer_timeout:g}s",
            "timeout_error",
        )

    def _policy(
        self, model: str | None, exclude: frozenset[tuple[int, int]], plan: Plan
    ) -> Callable[[], Eligible]:
        """The upstreams a request may use, evaluated afresh each time it is asked."""
        missed = self.settings.missed_reports
        return lambda: Policy(
            time.monotonic(),
            missed,
            model,
            exclude,
            plan.prefer,
            plan.imbalance,
            plan.ranks,
            plan.spread,
        )

    # -- requests that take none -----------------------------------------------------------

    async def _without_slot(self, exchange: Exchange, body: bytes, model: str | None) -> None:
        tried: set[tuple[int, int]] = set()
        last_error = "no upstream is available"
        retries = _Retries(self.settings.max_retries)
        while retries.left():
            candidates = eligible(
                time.monotonic(), self.settings.missed_reports, model, frozenset(tried)
            )(self.table.rows())
            if not candidates:
                break
            row = candidates[0]
            try:
                await self._forward(exchange, row, body)
                return
            except RetryableError as error:
                last_error = self._note_failure(exchange, row, error, tried)
        await _fail(exchange, 503, last_error, "unavailable_error", [(b"retry-after", b"1")])

    # -- forwarding and failures -----------------------------------------------------------

    async def _forward(
        self, exchange: Exchange, row: UpstreamRow, body: bytes, queued: float = 0.0
    ) -> None:
        rewrite = self.settings.rewrite_host_header or exchange.header(b"host") is None
        headers = request_headers(
            exchange.headers,
            exchange.request_id,
            row.address if rewrite else None,
            keep_credentials=not self.api_keys,
            upstream_api_key=self.settings.upstream_api_key,
        )
        exchange.upstream = row.name
        exchange.attempts += 1
        if exchange.trace is not None:
            # The upstream's work joins the request's trace, as a child of its span.
            headers = [pair for pair in headers if pair[0] != b"traceparent"]
            headers.append((b"traceparent", traceparent(*exchange.trace)))
        if self.settings.debug_headers:
            exchange.extra_headers = [
                (b"x-paddler-upstream", row.name.encode()),
                (b"x-paddler-queue-ms", b"%.1f" % (queued * 1000)),
            ]
            if exchange.cache_expected is not None:
                exchange.extra_headers.append(
                    (b"x-paddler-cache", exchange.cache_expected.encode())
                )
            if exchange.slot_named:
                exchange.extra_headers.append((b"x-paddler-slot", b"%d" % exchange.slot))
        try:
            status = await forward(
                self.pool,
                row.address,
                exchange.method,
                exchange.target,
                headers,
                body,
                exchange,
                self.settings.upstream_read_timeout,
            )
        except UpstreamFailedError as error:
            log.error(
                "[%s] upstream %s (%s) failed: %s",
                exchange.request_id,
                row.name,
                row.address,
                error,
            )
            self._failed(row, str(error), at_once=exchange.response_started)
            await _end_with_error(exchange, f"upstream {row.name} failed: {error}")
            return
        if status >= 500:
            self._failed(row, f"answered {status}")
        elif self._failures or row.ejections:  # else nothing to forgive
            self._succeeded(row)

    def _note_failure(
        self,
        exchange: Exchange,
        row: UpstreamRow,
        error: RetryableError,
        tried: set[tuple[int, int]],
    ) -> str:
        """What a retryable failure on ``row`` means for the next attempt; its account."""
        described = f"{row.name} ({row.address}): {error}"
        self.recorder.retried(row.name)
        log.warning("[%s] %s; trying another upstream", exchange.request_id, described)
        tried.add((row.index, row.generation))
        self._failed(row, str(error))
        return described

    def _failed(self, row: UpstreamRow, reason: str, at_once: bool = False) -> None:
        key = (row.index, row.generation)
        if len(self._failures) > 4096:
            self._failures.clear()  # counts of long-gone upstreams: a bound, not a reset rule
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        if not at_once and failures < self.settings.eject_after_failures:
            return
        seconds = self.fleet.table.eject(
            row.index,
            row.generation,
            time.monotonic(),
            self.settings.ejection_initial,
            self.settings.ejection_max,
            self._is_last,
        )
        if seconds is not None:
            del self._failures[key]
            self.recorder.ejected(row.name)
            log.warning(
                "ejected upstream %s (%s) for %gs: %s", row.name, row.address, seconds, reason
            )

    def _succeeded(self, row: UpstreamRow) -> None:
        key = (row.index, row.generation)
        if self._failures.pop(key, 0) or row.ejections:
            self.fleet.table.forgive(row.index, row.generation)

    def _is_last(self, rows: list[UpstreamRow], failing: UpstreamRow) -> bool:
        """Whether no other upstream could serve the failing one's model right now."""
        now = time.monotonic()
        names = model_names(failing.model)
        others = [
            row
            for row in eligible(now, self.settings.missed_reports, None)(rows)
            if row.index != failing.index and (not names or model_names(row.model) & names)
        ]
        return not others

    # -- answered by the balancer itself ---------------------------------------------------

    def fleet_health(self) -> dict[str, Any]:
        now = time.monotonic()
        rows = self.fleet.table.rows()
        states: dict[str, int] = {}
        idle = processing = total = 0
        for row in rows:
            state = self.fleet.state_name(row, now)
            states[state] = states.get(state, 0) + 1
            if state == "ready":  # in rotation (paddler/slots/view.py)
                total += row.slots_total
                processing += row.slots_total - row.free_slots
                idle += row.free_slots
        return {
            "status": "ok",
            "slots": {"idle": idle, "processing": processing, "total": total},
            "upstreams": states,
            "queued": self.fleet.table.waiting(),
        }

    def models(self) -> dict[str, Any]:
        rows = [row for row in self.fleet.table.rows() if row.state is not UpstreamState.REMOVED]
        return {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "owned_by": "llamacpp",
                    "upstreams": sum(1 for row in rows if row.model == model),
                }
                for model in fleet_models(rows)
            ],
        }


# typeshed takes _json.make_scanner's class for its argument; it is the decoder.
_SCAN_JSON: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
)
_JSON_WHITESPACE: Final = " \t\n\r"


def parse_json(text: str) -> Any:
    """json.loads(text): the same values and the same errors, without the three Python
    frames json.loads runs around its C scanner (for a chat request's body, those frames
    cost about as much as the scanning itself)."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
    try:
        value, end = _SCAN_JSON(text, start)
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    if end != len(text):
        tail = text[end:]
        extra = end + len(tail) - len(tail.lstrip(_JSON_WHITESPACE))
        if extra != len(text):
            raise json.JSONDecodeError("Extra data", text, extra)
    return value


class _RememberWhenAnswered:
    """The upstream holds the request's prefixes once its answer begins: a stream's
    first token comes after the prompt is in the KV cache. Remembered earlier, while
    the prompt is still being read, a request with the same prefix arriving meanwhile
    would be sent after a cache that is not there yet, and both would crowd one
    upstream. ``occupied`` gets the keys that are busy until the request ends. (A class,
    not a closure: compiled, a closure and its scope refer to each other, a cycle per
    request for the garbage collector.)"""

    __slots__ = ("affinity", "early", "occupied", "plan", "row")

    def __init__(
        self, affinity: Affinity, plan: Plan, row: UpstreamRow, occupied: list[int], early: int
    ) -> None:
        self.affinity = affinity
        self.plan = plan
        self.row = row
        self.occupied = occupied
        self.early = early  # the prefix's length occupied already, as the request took the slot

    def __call__(self, exchange: Exchange) -> None:
        if exchange.slot >= 0:
            self.affinity.begun(self.row, exchange.slot)
        if exchange.status < 300:
            self.occupied.extend(
                self.affinity.holds(self.plan, self.row, exchange.event_stream, self.early)
            )


def may_name_slot(path: str, payload: Any) -> bool:
    """Whether a request may name its llama.cpp slot: a completion whose client named none."""
    return (
        isinstance(payload, dict)
        and bool(payload)
        and "id_slot" not in payload
        and path in SLOT_NAMING_ROUTES
    )


def naming(body: bytes, slot: int) -> bytes:
    """A JSON object's body with ``"id_slot": slot`` as its first member (the body of a
    request whose payload parsed as a non-empty object, without an id_slot)."""
    start = body.index(b"{") + 1
    return b'%s"id_slot":%d,%s' % (body[:start], slot, body[start:])


class _Retries:
    """How many more attempts a request gets. (A kept-alive connection that the upstream
    closed as it was reused costs none: upstream.forward sends again on a new one.)"""

    def __init__(self, max_retries: int) -> None:
        self._attempts_left = max_retries + 1

    def left(self) -> bool:
        if self._attempts_left <= 0:
            return False
        self._attempts_left -= 1
        return True


async def _fail(
    exchange: Exchange,
    status: int,
    message: str,
    kind: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    if status >= 500:
        log.warning("[%s] %d: %s", exchange.request_id, status, message)
    await exchange.respond(status, error_payload(message, kind, status), headers)


async def _end_with_error(exchange: Exchange, message: str) -> None:
    """An upstream broke: tell the client in the way its answer allows."""
    if not exchange.response_started:
        await _fail(exchange, 502, message, "upstream_error")
    elif exchange.event_stream:
        # A stream of events ends with an error event, as llama.cpp sends them itself.
        event = json.dumps(error_payload(message, "upstream_error", 502))
        await exchange.write(f"data: {event}\n\n".encode())
        await exchange.end()
    # Anything else can only say it by ending before its end: its connection is closed.
