"""The balancer's HTTP/1.1 server side: connections parsed by httptools, without ASGI.

Both of a worker's ports are served here: the proxy's, because what Uvicorn's ASGI
cycle costs per request is most of what a proxy costs (docs/performance.md: a bare
uvloop + httptools proxy spent a fifth of the CPU of the same proxy behind it), and
the management API's, where a big fleet's agents report a thousand times a second
(its other routes are Starlette's, through asgi.py). The protocol hands a request to
its handler only once it is whole, and owns everything below that: keep-alive and
pipelining, Expect: 100-continue, the deadlines for a request's head and body, the
body limit, chunked answers, backpressure from slow clients, and stopping the
request the moment its client leaves.
"""

import asyncio
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, cast
from urllib.parse import unquote

import httptools

log = logging.getLogger("paddler.balancer")

# Request line and headers together; past it, 431. llama.cpp's clients send small heads.
MAX_HEAD_BYTES: Final = 64 * 1024
REASONS: Final = {status.value: status.phrase.encode() for status in HTTPStatus}
BODILESS_STATUS: Final = frozenset({204, 304})
# The request headers that decide how its head and body are read.
_HEAD_RULES: Final = frozenset((b"host", b"content-length", b"expect", b"transfer-encoding"))
# Seconds a refused client's remaining bytes are read and dropped before the close.
LINGER_SECONDS: Final = 2.0


@dataclass(frozen=True)
class ClientLimits:
    max_body_size: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    send_timeout: float


def error_payload(message: str, kind: str, code: int) -> dict[str, Any]:
    """An error in the OpenAI shape, which llama.cpp also uses, so clients parse it."""
    return {"error": {"message": message, "type": kind, "code": code}}


class Exchange:
    """One client request, whole, and the answer written back on its connection."""

    def __init__(
        self,
        connection: "ClientConnection",
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        http11: bool,
        keep_alive: bool,
    ) -> None:
        self.connection = connection
        self.method = method
        self.target = target  # as the client sent it: forwarded unchanged
        path, _, _ = target.partition("?")
        self.path = unquote(path) if "%" in path else path  # what routing decisions see
        self.headers = headers
        self.body = body
        self.http11 = http11
        self.keep_alive = keep_alive
        self.request_id = ""
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.client_left = False
        self.status = 0
        self.upstream = "none"  # the name of the upstream that answered, for the metrics
        self.first_byte_at = 0.0  # when the first body bytes went out (monotonic)
        # Called as they go, with this exchange (a callback that kept the exchange itself
        # would make a reference cycle: every request left for the garbage collector).
        self.on_first_byte: Callable[[Exchange], None] | None = None
        self.queued = 0.0  # seconds it waited for a free slot
        self.attempts = 0  # upstreams tried
        self.trace: tuple[bytes, bytes] | None = None  # trace and span id, when tracing
        # b"" to watch the answer for llama.cpp's timings (answers that took a slot: their
        # prompt tokens are counted, and cache-aware routing learns from them): then the
        # last chunk that carried them.
        self.timings: bytes | None = None
        self.cache_expected: str | None = None  # "hit" or "miss": was the prefix expected here
        # The llama.cpp slot the slot record has the request take (-1: none), and whether
        # the request names it (id_slot) or leaves it to llama.cpp, which takes the same.
        self.slot = -1
        self.slot_named = False
        # Whether the request relies on llama.cpp's host-memory prompt cache there for
        # most of the prefix expected (Affinity.pin).
        self.from_host_cache = False
        self.response_started = False
        self.response_complete = False
        self.event_stream = False
        self._chunked = False
        self._head: bytes | None = None

    def client(self) -> tuple[str, int] | None:
        """The client's address and port, as the socket says."""
        transport = self.connection.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return (peer[0], peer[1]) if peer else None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    # -- the answer (upstream.Responder) ---------------------------------------------------

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.begin(status, headers)

    def begin(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Compose the status line and headers; they go out with the first body bytes."""
        self.response_started = True
        self.status = status
        lines = [_status_line(status)]
        has_length = False
        for name, value in headers:
            if name == b"content-length":
                has_length = True
            elif name == b"content-type":
                self.event_stream = value.startswith(b"text/event-stream")
            lines.append(name + b": " + value)
        bodiless = self.method == "HEAD" or status in BODILESS_STATUS or status < 200
        if not has_length and not bodiless:
            if self.http11:
                self._chunked = True
                lines.append(b"transfer-encoding: chunked")
            else:
                self.keep_alive = False  # an HTTP/1.0 body without a length ends with the close
        if self.connection.closing:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"connection: close")
        elif not self.http11:
            lines.append(b"connection: keep-alive")
        if self.request_id:
            lines.append(b"x-request-id: " + self.request_id.encode("latin-1"))
        if self.extra_headers:
            lines.extend(name + b": " + value for name, value in self.extra_headers)
        self._head = b"\r\n".join(lines) + b"\r\n\r\n"
        if bodiless:
            self._chunked = False

    def send(self, chunk: bytes, last: bool = False) -> bool:
        """Pass body bytes on at once, with the answer's end if ``last``: a stream's end
        then costs no write of its own. False when the client is behind (when_drained)."""
        if self.method == "HEAD" or not (chunk or last):
            return True
        if not self.first_byte_at:
            self.first_byte_at = time.monotonic()
            if self.on_first_byte is not None:
                self.on_first_byte(self)
        if self.timings is not None:
            # llama.cpp's timings end its answer (a stream's last event, before at most
            # "data: [DONE]"): only the end of what a read brought is searched, not every
            # byte of every read (a stream's whole text, often in one read).
            at = chunk.find(b'"cache_n"', len(chunk) - TIMINGS_WITHIN)
            if at >= 0:
                self.timings = chunk[at:]
        head, self._head = self._head, None
        if self._chunked:
            # The head, the chunk's frame and the answer's end in one piece: the chunk
            # (a stream's whole text, often) is copied once.
            end = b"0\r\n\r\n" if last else b""
            if last:
                self._chunked = False  # ended: end() adds nothing
            if chunk:
                chunk = b"".join((head or b"", b"%x\r\n" % len(chunk), chunk, b"\r\n", end))
            else:
                chunk = head + end if head is not None else end
        elif head is not None:
            chunk = head + chunk
        return self.connection.send(chunk) if chunk else True

    def when_drained(self, callback: Callable[[], None]) -> None:
        self.connection.when_drained(callback)

    async def write(self, chunk: bytes) -> None:
        if not self.send(chunk):
            await self.connection.drained()

    async def end(self) -> None:
        if not self._complete():
            await self.connection.drained()

    async def finish(self, chunk: bytes) -> None:
        if self.method == "HEAD" or not chunk:
            await self.end()
            return
        # send() ends a chunked answer along with its last chunk.
        sent = self.send(chunk, last=True)
        self._chunked = False
        self.response_complete = True
        if not sent:
            await self.connection.drained()

    def _complete(self) -> bool:
        """Write what ends the answer (the last chunk; the head of a bodiless one)."""
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._head is not None:
            tail, self._head = self._head + tail, None
        self._chunked = False
        self.response_complete = True
        return self.connection.send(tail) if tail else True

    async def respond(
        self, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """A whole JSON answer of the balancer's own (``payload`` as bytes: already JSON)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.answer(status, body, headers)
        if self.connection.behind():
            await self.connection.drained()

    def answer(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """A whole JSON answer, written at once (small: the socket's buffer takes it)."""
        self.begin(
            status,
            [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                *(headers or []),
            ],
        )
        self.send(body)
        self._complete()


Handler = Callable[[Exchange], Coroutine[Any, Any, None]]
# Answers a request on the spot if it can (True), with no task of its own: for requests
# that need no waiting, such as agents' reports, a thousand a second in a big fleet.
QuickHandler = Callable[[Exchange], bool]


# How far from the end of a read llama.cpp's timings can start: its last event carries
# them near its end, followed by at most "data: [DONE]".
TIMINGS_WITHIN: Final = 4096

# Each status's line, made once: formatting bytes costs more than the rest of a head.
# (Statuses come from upstreams, which could send any of 100-999: a bound of its own.)
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s" % (
            status,
            REASONS.get(status, b"Unknown"),
        )
    return line


class _Detached:
    """The callback target of the parser a closed connection keeps: it is never fed."""


_DETACHED_PARSER: Final = httptools.HttpRequestParser(_Detached())


class ClientConnection(asyncio.Protocol):
    """One client connection: its requests, one at a time, in the order they came."""

    def __init__(
        self,
        handler: Handler,
        limits: ClientLimits,
        registry: set["ClientConnection"],
        quick: QuickHandler | None = None,
    ):
        self.handler = handler
        self.quick = quick
        self.limits = limits
        self.registry = registry
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.parser = httptools.HttpRequestParser(self)
        self.task: asyncio.Task[None] | None = None
        self.exchange: Exchange | None = None
        self._pending: deque[Exchange] = deque()
        self._writable: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._on_drained: list[Callable[[], None]] = []
        self._send_deadline: asyncio.TimerHandle | None = None
        # The request being read.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._partial_head = 0
        self._hosts = 0
        self._length: int | None = None  # the first Content-Length
        self._expect: bytes | None = None  # the first Expect
        self._transfer_encoding = False
        self._expects_continue = False
        self._discarding = False
        self._reading: str | None = None  # "head" or "body" of a request on its way
        self._refusal: tuple[int, str] | None = None  # held until the answer in flight ends
        # One deadline at a time (head, body, idle), on one timer pushed back lazily:
        # re-arming it per request would cost a timer of its own each time.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._on_deadline: Callable[[], None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.registry.add(self)
        self._arm(self.limits.header_timeout, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return  # after a refusal: read and dropped, so that closing sends no reset
        try:
            self.parser.feed_data(data)
            if self._reading == "head":
                # httptools reports a header only once its line ends: count what a head
                # still in progress took, or one endless line would grow without a bound.
                self._partial_head += len(data)
                if self._partial_head > MAX_HEAD_BYTES:
                    self._refuse(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
        except httptools.HttpParserUpgrade:
            # No upgrade is offered: the request is answered over HTTP/1.1 as RFC 9110
            # 7.8 allows, and the connection closes after it, since the parser stops here.
            self.closing = True
            if self.transport is not None:
                self.transport.pause_reading()
            if self.task is None:
                self.close()
        except httptools.HttpParserError as error:
            self._refuse(400, f"malformed HTTP request: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closing = True
        self._pending.clear()
        self._on_drained.clear()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("the client left"))
        if self.task is not None and not self.task.done():
            assert self.exchange is not None
            self.exchange.client_left = True
            self.task.cancel()
        # It and its parser refer to each other (it is the parser's callback target), and
        # nothing is parsed after this: parted, a closed connection is freed at once
        # rather than by the garbage collector.
        self.parser = _DETACHED_PARSER

    def pause_writing(self) -> None:
        self._paused_writing = True
        if self._send_deadline is not None:
            self._send_deadline.cancel()
        self._send_deadline = self.loop.call_later(self.limits.send_timeout, self._too_slow_to_read)

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        callbacks, self._on_drained = self._on_drained, []
        for callback in callbacks:
            callback()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._body_size = self._head_size = self._hosts = 0
        self._length = self._expect = None
        self._transfer_encoding = False
        self._expects_continue = False
        self._reading = "head"
        if self.task is None:
            self._arm(self.limits.header_timeout, self._head_too_slow)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._reading != "head":
            return  # a trailer after a chunked body: not a header of the request
        name = name.lower()
        self._headers.append((name, value))
        # What on_headers_complete decides by, noted as it passes rather than searched.
        if name in _HEAD_RULES:
            if name == b"host":
                self._hosts += 1
            elif name == b"content-length":
                if self._length is None:
                    self._length = int(value)  # httptools refused one that is not a number
            elif name == b"expect":
                if self._expect is None:
                    self._expect = value
            else:
                self._transfer_encoding = True
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._partial_head = 0
        if self._hosts > 1:
            self._refuse(400, "more than one Host header (RFC 9112 3.2)")
            return
        length = self._length
        if self.parser.should_upgrade() and (length or self._transfer_encoding):
            # httptools skips the body of an upgrade request: forwarding it without its
            # body would send the upstream something else than what the client sent.
            self._refuse(400, "a protocol upgrade request with a body is not supported")
            return
        if length is not None and length > self.limits.max_body_size:
            self._refuse(413, f"the request body is larger than {self.limits.max_body_size} bytes")
            return
        expect = self._expect
        if expect is not None:
            if expect.lower() != b"100-continue":
                self._refuse(417, "only Expect: 100-continue is understood")
                return
            # Not while another answer is on the wire: it goes out when that one ends.
            self._expects_continue = self.parser.get_http_version() == "1.1"
            if self.task is None:
                self._send_continue()
        self._reading = "body"
        if self.task is None:
            self._arm(self.limits.body_timeout, self._body_too_slow)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.max_body_size:
            self._refuse(413, f"the request body is larger than {self.limits.max_body_size} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.closing or self._refusal:
            return
        self._reading = None
        exchange = Exchange(
            self,
            self.parser.get_method().decode("latin-1"),
            self._target(),
            self._headers,
            b"".join(self._body),
            self.parser.get_http_version() == "1.1",
            self.parser.should_keep_alive(),
        )
        self._body = []
        if self.task is None:
            self._disarm()
            self._run(exchange)
        else:
            # Pipelined behind the one in flight: hold it, and stop reading meanwhile.
            self._pending.append(exchange)
            if self.transport is not None:
                self.transport.pause_reading()

    # -- running requests ------------------------------------------------------------------

    def _run(self, exchange: Exchange) -> None:
        if self.quick is not None:
            try:
                answered = self.quick(exchange)
            except Exception as error:
                self._after(exchange, error)
                return
            if answered:
                self._after(exchange, None)
                return
        self.exchange = exchange
        self.task = self.loop.create_task(self.handler(exchange))
        self.task.add_done_callback(self._finished)

    def _finished(self, task: "asyncio.Task[None]") -> None:
        exchange = self.exchange
        self.task = self.exchange = None
        self._after(exchange, None if task.cancelled() else task.exception())

    def _after(self, exchange: Exchange | None, error: BaseException | None) -> None:
        """A request's answer is done (or failed): on to the next, or close."""
        if exchange is None or self.transport is None or self.transport.is_closing():
            return
        if error is not None:
            log.error(
                "[%s] the request failed inside the balancer: %r",
                exchange.request_id,
                error,
                exc_info=error,
            )
        if not exchange.response_complete:
            # Started and cut short, or never answered: only closing tells the client.
            if exchange.response_started or self.closing:
                self.close()
            else:
                self._refuse(500, "the balancer failed on this request; see its log")
            return
        if not exchange.keep_alive or self.closing:
            self.close()
            return
        if self._refusal is not None and not self._pending:
            self._refuse(*self._refusal)
            return
        if self._pending:
            self._run(self._pending.popleft())
            if not self._pending:
                self.transport.resume_reading()
            return
        self.transport.resume_reading()
        if self._reading == "body":
            self._send_continue()
            self._arm(self.limits.body_timeout, self._body_too_slow)
        elif self._reading == "head":
            self._arm(self.limits.header_timeout, self._head_too_slow)
        else:
            self._arm(self.limits.keepalive_timeout, self.close)

    def send(self, data: bytes) -> bool:
        """Write at once; False when the client's socket buffer is past its high water
        mark. A client that then takes nothing for send_timeout is cut off."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return True  # it left: connection_lost cancels the request's task
        transport.write(data)
        return not self._paused_writing

    def when_drained(self, callback: Callable[[], None]) -> None:
        if self._paused_writing:
            self._on_drained.append(callback)
        else:
            self.loop.call_soon(callback)

    def behind(self) -> bool:
        return self._paused_writing

    async def drained(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left")
        if self._paused_writing:
            self._writable = self.loop.create_future()
            try:
                await self._writable
            finally:
                self._writable = None

    def close(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def shut_down(self) -> None:
        """Stop taking requests: close now if idle, else after the answer in flight."""
        self.closing = True
        if self.task is None:
            self.close()

    # -- refusals and deadlines ------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        """Answer with an error the balancer makes itself, then close: what is left of
        the request on the wire cannot be trusted or is not worth reading."""
        if self.closing or self.transport is None:
            return
        if self.task is not None:
            # An answer is on the wire: this one follows it.
            self._refusal = (status, message)
            self.transport.pause_reading()
            return
        body = json.dumps(error_payload(message, "invalid_request_error", status)).encode()
        if status >= 500:
            body = json.dumps(error_payload(message, "internal_error", status)).encode()
        log.info("answered %d and closed the connection of %s: %s", status, self._peer(), message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%b"
            % (status, REASONS.get(status, b"Error"), len(body), body)
        )
        self._linger()

    def _linger(self) -> None:
        """Close without a reset: closing with unread bytes makes the kernel send one,
        which can destroy the answer before the client reads it. So stop sending, and
        read and drop what the client still sends, for a moment (nginx's lingering close)."""
        assert self.transport is not None
        self.closing = True
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self._arm(LINGER_SECONDS, self.close)

    def _send_continue(self) -> None:
        if self._expects_continue and self.transport is not None:
            self._expects_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")

    def _target(self) -> str:
        url = self._url
        if not url.startswith(b"/") and url != b"*":
            parsed = httptools.parse_url(url)  # absolute form: keep the path and query
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        return url.decode("latin-1")

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._deadline = self.loop.time() + seconds
        self._on_deadline = callback
        if self._timer is not None and self._timer_at > self._deadline:
            self._timer.cancel()  # an earlier deadline than the timer's: a new timer
            self._timer = None
        if self._timer is None:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._deadline_reached)

    def _disarm(self) -> None:
        self._on_deadline = None  # the timer stays, and finds nothing to do

    def _deadline_reached(self) -> None:
        self._timer = None
        if self._on_deadline is None:
            return
        if self.loop.time() < self._deadline:  # pushed back since the timer was set
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._deadline_reached)
            return
        callback, self._on_deadline = self._on_deadline, None
        callback()

    def _head_too_slow(self) -> None:
        if self._reading == "head":
            log.info(
                "closed the connection of %s: its request headers took over %gs",
                self._peer(),
                self.limits.header_timeout,
            )
        self.close()

    def _too_slow_to_read(self) -> None:
        log.info(
            "closed the connection of %s: it accepted nothing of its answer for %gs",
            self._peer(),
            self.limits.send_timeout,
        )
        if self.transport is not None:
            self.transport.abort()  # close() would wait to flush what it will never read

    def _body_too_slow(self) -> None:
        self._refuse(408, f"the request body took longer than {self.limits.body_timeout:g}s")

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "a client"


class Listener:
    """One port's listening sockets in one worker (the proxy's, or the management
    API's), and every connection they accepted."""

    def __init__(
        self, handler: Handler, limits: ClientLimits, quick: QuickHandler | None = None
    ) -> None:
        self.handler = handler
        self.quick = quick
        self.limits = limits
        self.connections: set[ClientConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(
                lambda: ClientConnection(self.handler, self.limits, self.connections, self.quick),
                sock=sock,
                backlog=2048,
            )
            self._servers.append(server)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let answers in flight finish for up to ``grace`` seconds."""
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.shut_down()
        deadline = asyncio.get_running_loop().time() + grace
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.task is not None:
                connection.task.cancel()
            connection.close()
