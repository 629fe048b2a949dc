"""Pooled HTTP/1.1 connections to upstreams: requests written whole, answers parsed by httptools.

Why not aiohttp: on this path it was the largest single cost per proxied request
(request objects, header multidicts and URL parsing for every request; see
docs/performance.md). The proxy needs little of a general client: no redirects,
cookies, TLS or decompression, one body already in memory, and responses passed on
as they come. What it does need, a general client hides: whether a connection was
fresh or reused, and exactly how far an answer got before it failed.

One pool per worker process, one list of idle connections per upstream address,
the newest taken first so that the fewest connections stay warm. An idle connection is closed
after ``keepalive_timeout`` seconds: idle connections hold one of llama-server's
HTTP threads each, and the upstream closes them itself a little later.
"""

import asyncio
import socket
from collections.abc import Callable, Iterable
from typing import Final, cast

import httptools

# Hop-by-hop headers (RFC 9110 7.6.1): they concern one connection, and are not passed on.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
# Buffered answer bytes past which the upstream is paused until the client takes them.
HIGH_WATER: Final = 256 * 1024


class ConnectFailedError(Exception):
    """No connection could be made: nothing reached the upstream."""


class DroppedError(Exception):
    """The connection closed or broke before the answer's status line."""

    def __init__(self, reason: str, reused: bool) -> None:
        super().__init__(reason)
        self.reused = reused  # a kept-alive connection: the upstream may have closed it idle


class BrokenAnswerError(Exception):
    """The answer stopped, or was malformed, after it began."""


class SilentError(Exception):
    """The upstream said nothing for longer than the read timeout."""


class UpstreamConnection(asyncio.Protocol):
    """One connection and the one answer it is reading at a time."""

    def __init__(self, pool: "ConnectionPool", address: str) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests = 0
        self.sent_at = 0.0
        self.idle_since = 0.0  # when it was last pooled (loop time)
        self._answer: Answer | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        try:
            answer.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.close()
            answer.fail(BrokenAnswerError(f"malformed answer: {error}"))
        else:
            answer.arrived(len(data))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer, self._answer = self._answer, None
        if answer is None:
            self.pool.discard(self)  # an idle one: out of the pool now, not when next asked
            return
        if answer.status and answer.ends_with_close and exc is None:
            answer.complete = True  # no length and no chunks: the close is its end
            answer.wake()
        elif not answer.complete:
            reason = f"{exc}" if exc else "closed by the upstream"
            if answer.status:
                answer.fail(BrokenAnswerError(f"the answer broke off: {reason}"))
            else:
                waited = self.pool.loop.time() - self.sent_at
                reused = self.requests > 1
                where = f"request {self.requests} of a kept-alive" if reused else "a new"
                answer.fail(
                    DroppedError(f"{reason} after {waited:.3f}s, on {where} connection", reused)
                )

    def pause_writing(self) -> None:
        pass  # bodies are written whole and bounded by max_body_size

    def resume_writing(self) -> None:
        pass

    # -- use -------------------------------------------------------------------------------

    def send(self, request: bytes, bodiless: bool) -> "Answer":
        assert self.transport is not None
        self.requests += 1
        self.sent_at = self.loop.time()
        self._answer = Answer(self, bodiless)
        self.transport.write(request)
        return self._answer

    def finished(self, answer: "Answer") -> None:
        """The answer's reader is done with it: pool the connection or close it."""
        self._answer = None
        answer.let_go()
        if answer.complete and answer.keep_alive and not answer.bodiless and not self.closed:
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class _Detached:
    """The callback target of the parser a finished answer keeps: it is never fed."""


_DETACHED_PARSER: Final = httptools.HttpResponseParser(_Detached())


class Answer:
    """The answer to one request, read as it arrives: its parser calls it directly (a
    stream's every chunk passes here, so the fewer calls the better)."""

    def __init__(self, connection: UpstreamConnection, bodiless: bool) -> None:
        self.connection = connection
        self.bodiless = bodiless
        self.status = 0
        self.keep_alive = False
        self.ends_with_close = False
        self.sized = False  # a Content-Length: not a stream
        self.complete = False
        # End to end (RFC 9110 7.6.1), names in lower case: as the client gets them.
        self.headers: list[tuple[bytes, bytes]] = []
        self._transfer_encoding = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._sink: Callable[[bytes, bool], None] | None = None
        self._loop = connection.loop
        self._last_data = 0.0
        self._silence: asyncio.TimerHandle | None = None
        # Every chunk of the body goes straight into the list, with no Python call per
        # chunk (a stream's every event is one): arrived() sees to them once per read.
        # The parser looks its callbacks up once, as it is made: this one goes first.
        self.on_body: Callable[[bytes], None] = self._chunks.append
        self.parser = httptools.HttpResponseParser(self)

    # -- httptools callbacks, as the connection feeds the parser ---------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in HOP_BY_HOP:
            self.headers.append((name, value))
            if name == b"content-length":
                self.sized = True
        elif name == b"transfer-encoding":
            self._transfer_encoding = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.ends_with_close = not (
            self.bodiless
            or self.sized
            or self.status in (204, 304)
            or self.status < 200
            or self._transfer_encoding
        )
        self.wake()
        if self.bodiless:
            self.on_message_complete()

    def on_message_complete(self) -> None:
        if not self.complete:
            self.complete = True
            self.wake()

    # -- fed by the connection -------------------------------------------------------------

    def arrived(self, size: int) -> None:
        """One read of ``size`` bytes is parsed: a relayed answer passes its chunks on, in
        one piece; otherwise its reader is woken, and an upstream that sent more than the
        client took is paused."""
        if not self._chunks:
            return
        if self._sink is not None:
            self.flush()
            return
        self._buffered += size
        if self._buffered > HIGH_WATER and not self._paused:
            transport = self.connection.transport
            if transport is not None:
                transport.pause_reading()
                self._paused = True
        self.wake()

    def let_go(self) -> None:
        """Done with: drop what refers back to this answer (its parser, whose callback
        target it is, and a relay's sink), so that it goes as soon as the request lets go
        of it, instead of leaving a cycle per request to the garbage collector."""
        self.parser = _DETACHED_PARSER
        self._sink = None

    def fail(self, error: Exception) -> None:
        if self._error is None:  # the first cause; a close that follows it is its echo
            self._error = error
        self.wake()

    def wake(self) -> None:
        # Woken once: the chunks that follow in the same read need not look again.
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the proxy -----------------------------------------------------------------

    async def head(self, timeout: float) -> None:
        """Wait for the status line and headers."""
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait(timeout)

    async def body(self, timeout: float) -> bytes | None:
        """What has arrived since the last call, at least one byte; None at the end."""
        while True:
            if self._chunks:
                return self.take()
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait(timeout)

    def take(self) -> bytes:
        """Everything that has arrived and was not read yet (b"" if nothing); an upstream
        paused for having sent too much is let go on."""
        data = b"".join(self._chunks) if len(self._chunks) > 1 else (self._chunks or [b""])[0]
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            transport = self.connection.transport
            if transport is not None and not self.connection.closed:
                transport.resume_reading()
        return data

    def flush(self) -> None:
        """Pass on, in one piece, what the last read brought to a relayed answer: one
        write to the client for many chunks, and for the answer's end when it came too."""
        sink = self._sink
        if sink is None or not self._chunks:
            return
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._last_data = self._loop.time()
        sink(data, self.complete)

    def relay(self, sink: Callable[[bytes, bool], None]) -> None:
        """From now on, hand body bytes to ``sink`` from the connection's own callback as
        they arrive. A stream's reads then cost no task switch, future or timer each
        (with one worker, about a quarter less CPU per proxied SSE stream; see
        docs/performance.md)."""
        self._sink = sink
        self._buffered = 0
        if self._chunks:
            self.release()  # whatever held the upstream back is in the sink's hands now
            self.flush()

    def hold(self) -> None:
        """The client is behind: read nothing more from the upstream until release()."""
        transport = self.connection.transport
        if not self._paused and transport is not None and not self.connection.closed:
            transport.pause_reading()
            self._paused = True

    def release(self) -> None:
        if self._paused:
            self._paused = False
            transport = self.connection.transport
            if transport is not None and not self.connection.closed:
                transport.resume_reading()
        self._last_data = self._loop.time()  # silence while held was not the upstream's

    async def relayed(self, timeout: float) -> None:
        """Wait until a relayed answer ends. SilentError when the upstream sends nothing
        for ``timeout`` seconds while the client keeps up."""
        # Checked through a local: mypy would take self._error for None for the rest of
        # the method, across the awaits, and mypyc compiles what mypy takes.
        error = self._error
        if error is not None:
            raise error
        if self.complete:
            return
        self._last_data = self._loop.time()
        self._silence = self._loop.call_later(timeout, self._check_silence, timeout)
        try:
            while not self.complete:
                if self._error is not None:
                    raise self._error
                waiter = self._waiter = self._loop.create_future()
                await waiter
        finally:
            self._silence.cancel()
            self._waiter = None

    def _check_silence(self, timeout: float) -> None:
        # One timer per answer, pushed back lazily, instead of one per chunk.
        if self.complete or self._error is not None:
            return
        quiet = 0.0 if self._paused else self._loop.time() - self._last_data
        if quiet >= timeout:
            self.fail(SilentError(f"silent for {timeout:g}s"))
            return
        self._silence = self._loop.call_later(timeout - quiet, self._check_silence, timeout)

    async def _wait(self, timeout: float) -> None:
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _expire(waiter: "asyncio.Future[None]", timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(SilentError(f"silent for {timeout:g}s"))


class ConnectionPool:
    """Idle kept-alive connections per upstream address, for one worker process.

    Idle connections expire by one timer for the whole pool, set for the oldest one's
    expiry, rather than a timer per connection: a request then costs no timer set and
    cancelled. A connection asked for past its expiry (the loop was late) is not reused.
    """

    def __init__(self, connect_timeout: float, keepalive_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        # Oldest first: taken from the end, expired from the front.
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's loop, remembered: on Python 3.11, asyncio.get_running_loop()
        costs a getpid() system call each time (it checks for a fork), five per request."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def idle(self, address: str) -> UpstreamConnection | None:
        """A kept-alive connection to ``address`` if one is open (else connect())."""
        idle = self._idle.get(address)
        if idle:
            oldest_usable = self.loop.time() - self.keepalive_timeout
            while idle:
                connection = idle.pop()
                if not connection.closed and connection.idle_since > oldest_usable:
                    return connection
                connection.close()
        return None

    async def connect(self, address: str) -> UpstreamConnection:
        """A new connection to ``address``."""
        host, _, port = address.rpartition(":")
        loop = self.loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self, address), host.strip("[]"), int(port)
                )
        except TimeoutError:
            raise ConnectFailedError(f"timed out after {self.connect_timeout:g}s") from None
        except (OSError, ValueError) as error:
            raise ConnectFailedError(str(error) or type(error).__name__) from None
        return connection

    def put(self, connection: UpstreamConnection) -> None:
        if self.keepalive_timeout <= 0:
            connection.close()
            return
        loop = self.loop
        connection.idle_since = loop.time()
        self._idle.setdefault(connection.address, []).append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(self.keepalive_timeout, self._expire)

    def _expire(self) -> None:
        """Close what has been idle for the keep-alive timeout; come back for the next."""
        self._sweep = None
        loop = self.loop
        oldest_kept = loop.time() - self.keepalive_timeout
        next_expiry: float | None = None
        for address, idle in list(self._idle.items()):
            expired = 0
            while expired < len(idle) and idle[expired].idle_since <= oldest_kept:
                idle[expired].close()
                expired += 1
            del idle[:expired]
            if not idle:
                del self._idle[address]
                continue
            expiry = idle[0].idle_since + self.keepalive_timeout
            next_expiry = expiry if next_expiry is None else min(next_expiry, expiry)
        if next_expiry is not None:
            self._sweep = loop.call_at(next_expiry, self._expire)

    def discard(self, connection: UpstreamConnection) -> None:
        idle = self._idle.get(connection.address)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.address]

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def request_bytes(
    method: str, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """The request as written on the wire, head and body in one piece."""
    parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if body or method in ("POST", "PUT", "PATCH"):
        parts.append(b"content-length: %d\r\n" % len(body))
    parts += (b"\r\n", body)
    return b"".join(parts)
