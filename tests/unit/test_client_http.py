"""The proxy's client side over raw sockets: framing, limits, deadlines, clients leaving.

The handler here is a stand-in for the proxy (it answers from the request itself);
the proxy in front of real llama-servers is tested in tests/integration/test_proxy.py.
"""

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Awaitable, Callable

from paddler.balancer.proxy.http import ClientLimits, Exchange, Listener
from paddler.testbed.ports import free_port

LIMITS = ClientLimits(
    max_body_size=1000,
    header_timeout=0.5,
    body_timeout=0.5,
    keepalive_timeout=0.5,
    send_timeout=0.5,
)


TIMED_EVENTS = (
    b'data: {"n": 1}\n\n' * 1000,
    b'data: {"n": 2}\n\n' * 1000
    + b'data: {"choices": [], "timings": {"cache_n": 7, "prompt_n": 9}}\n\ndata: [DONE]\n\n',
)


class Echo:
    """Answers with what it got; can stream, stall, fail, or note being stopped."""

    def __init__(self) -> None:
        self.seen: list[Exchange] = []
        self.stopped: list[str] = []
        self.stall = asyncio.Event()

    async def __call__(self, exchange: Exchange) -> None:
        exchange.request_id = f"r{len(self.seen)}"
        self.seen.append(exchange)
        if exchange.path == "/boom":
            raise RuntimeError("a bug")
        if exchange.path == "/stall":
            try:
                await self.stall.wait()
            except asyncio.CancelledError:
                self.stopped.append(exchange.request_id)
                raise
        if exchange.path == "/stream":
            await exchange.start(200, [(b"content-type", b"text/event-stream")])
            for n in range(3):
                await exchange.write(b"data: %d\n\n" % n)
            await exchange.end()
            return
        if exchange.path == "/timed":
            # As cache-aware routing watches a llama.cpp stream: its timings end it.
            exchange.timings = b""
            exchange.begin(200, [(b"content-type", b"text/event-stream")])
            exchange.send(TIMED_EVENTS[0])
            exchange.send(TIMED_EVENTS[1], last=True)
            await exchange.end()
            return
        if exchange.path == "/big":
            await exchange.start(200, [(b"content-length", b"%d" % (8 << 20))])
            try:
                for _ in range(128):
                    await exchange.write(b"x" * 65536)
            except asyncio.CancelledError:
                self.stopped.append(exchange.request_id)
                raise
            await exchange.end()
            return
        await exchange.respond(
            200, {"method": exchange.method, "path": exchange.path, "body": exchange.body.decode()}
        )

    def quick(self, exchange: Exchange) -> bool:
        """Answers /quick/... on the spot, without a task (as agents' reports are)."""
        if not exchange.path.startswith("/quick/"):
            return False
        if exchange.path == "/quick/boom":
            raise RuntimeError("a bug on the spot")
        exchange.answer(200, b'{"quick": "%s"}' % exchange.path.encode())
        return True


async def serving(
    test: Callable[[int, Echo, Listener], Awaitable[None]], limits: ClientLimits = LIMITS
) -> None:
    """Run ``test`` against a listener with the stand-in handler on a free port."""
    echo = Echo()
    listener = Listener(echo, limits, quick=echo.quick)
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.listen()
    await listener.start([sock])
    try:
        await test(sock.getsockname()[1], echo, listener)
    finally:
        echo.stall.set()
        await listener.stop(1.0)


async def exchange_raw(port: int, data: bytes, wait: float = 0.3) -> bytes:
    """Send ``data``, then read until the server closes or goes quiet for ``wait``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


def statuses(raw: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def run(
    test: Callable[[int, Echo, Listener], Awaitable[None]], limits: ClientLimits = LIMITS
) -> None:
    asyncio.run(serving(test, limits))


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        raw = await exchange_raw(port, post("/a", b"1") + post("/b", b"2") + post("/c", b"3"))
        assert statuses(raw) == [200, 200, 200]
        bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in raw.split(b"HTTP/1.1 ")[1:]]
        assert [(b["path"], b["body"]) for b in bodies] == [("/a", "1"), ("/b", "2"), ("/c", "3")]

    run(test)


def test_a_chunked_request_body_arrives_whole() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        raw = await exchange_raw(
            port,
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        assert statuses(raw) == [200]
        assert echo.seen[0].body == b"abcde"

    run(test)


def test_expect_100_continue_is_answered_before_the_body() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hi")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()

    run(test)


def test_bodies_over_the_limit_get_413_by_length_or_by_counting() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        declared = await exchange_raw(
            port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        )
        chunked = await exchange_raw(
            port,
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"x" * 512
            + b"\r\n"
            + b"200\r\n"
            + b"x" * 512
            + b"\r\n",
        )
        for raw in (declared, chunked):
            assert statuses(raw) == [413]
            assert b"larger than 1000 bytes" in raw
        assert echo.seen == []

    run(test)


def test_garbage_and_a_huge_head_are_refused_and_an_upgrade_ignored() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        garbage = await exchange_raw(port, b"\x16\x03\x01 hello TLS\r\n\r\n")
        upgrade = await exchange_raw(
            port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        )
        huge = await exchange_raw(port, b"GET /a HTTP/1.1\r\nX-Big: " + b"y" * 70000 + b"\r\n\r\n")
        assert statuses(garbage) == [400]
        assert b"malformed HTTP request" in garbage
        assert statuses(upgrade) == [200]  # answered over HTTP/1.1, upgrade ignored
        assert b"connection: close" in upgrade
        assert statuses(huge) == [431]
        assert [seen.path for seen in echo.seen] == ["/a"]  # the upgrade request only

    run(test)


def test_slow_heads_and_bodies_are_cut_off_and_idle_connections_closed() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        slow_head = await exchange_raw(port, b"GET /a HTTP/1.1\r\nHost: x\r\n", wait=2)
        slow_body = await exchange_raw(
            port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", wait=2
        )
        idle = await exchange_raw(port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", wait=2)
        assert slow_head == b""  # closed without an answer: it never asked for anything
        assert statuses(slow_body) == [408]
        assert statuses(idle) == [200]  # then closed by the keep-alive timeout, not by wait
        assert echo.seen[0].path == "/a"

    run(test)


def test_http_1_0_gets_its_own_framing() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        stream = await exchange_raw(port, b"GET /stream HTTP/1.0\r\n\r\n")
        kept = await exchange_raw(
            port, b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n"
        )
        assert stream.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding" not in stream  # no chunks for HTTP/1.0: the close ends it
        assert b"connection: close" in stream
        assert stream.endswith(b"data: 0\n\ndata: 1\n\ndata: 2\n\n")
        assert statuses(kept) == [200, 200]
        assert b"connection: keep-alive" in kept

    run(test)


def test_streams_are_chunked_and_head_answers_have_no_body() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        stream = await exchange_raw(port, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await exchange_raw(port, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"transfer-encoding: chunked" in stream
        assert stream.endswith(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        assert b"content-length: " in head
        assert head.endswith(b"\r\n\r\n")  # the length describes a body that is not sent

    run(test)


def test_a_stream_s_timings_are_found_at_its_end_and_its_chunks_framed_whole() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        raw = await exchange_raw(port, b"GET /timed HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _gap, body = raw.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head
        chunks = []
        while body:
            size, _line_end, rest = body.partition(b"\r\n")
            chunks.append(rest[: int(size, 16)])
            assert rest[int(size, 16) : int(size, 16) + 2] == b"\r\n"
            body = rest[int(size, 16) + 2 :]
        assert chunks == [*TIMED_EVENTS, b""]  # each write one chunk, then the end
        assert echo.seen[-1].timings == b'"cache_n": 7, "prompt_n": 9}}\n\ndata: [DONE]\n\n'

    run(test)


def test_a_client_leaving_stops_its_request() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.1)
        assert echo.stopped == ["r0"]

    run(test)


def test_a_bug_in_the_handler_is_a_500_not_a_hang() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        raw = await exchange_raw(port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n", wait=2)
        assert statuses(raw) == [500]
        assert b"connection: close" in raw

    run(test)


def test_a_slow_reader_makes_the_writer_wait() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.5)
        connection = next(iter(_.connections))
        # 8 MB answered, nothing read: the handler is parked, not buffering it all.
        assert connection.task is not None
        assert not connection.task.done()
        sock.close()

    run(test)


def test_a_graceful_stop_finishes_answers_in_flight_and_closes_idle_connections() -> None:
    async def test(port: int, echo: Echo, listener: Listener) -> None:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_writer.write(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
        await busy_writer.drain()
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(listener.stop(5.0))
        await asyncio.sleep(0.1)
        assert await idle_reader.read() == b""  # the idle one was closed at once
        echo.stall.set()
        answer = await asyncio.wait_for(busy_reader.read(), 2)
        assert statuses(answer) == [200]
        assert b"connection: close" in answer
        await asyncio.wait_for(stopping, 2)
        assert echo.stopped == []
        idle_writer.close()
        busy_writer.close()

    run(test)


def test_an_endless_header_line_is_cut_off_at_the_head_limit() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nX-Endless: ")
        answer = b""
        with contextlib.suppress(ConnectionError):
            for _piece in range(40):  # 2.5 MB if nobody stops it; never a line end
                writer.write(b"z" * 65536)
                await writer.drain()
                await asyncio.sleep(0.005)
        answer = await asyncio.wait_for(reader.read(), 3)
        assert statuses(answer) == [431]
        writer.close()

    run(test)


def test_an_upgrade_request_with_a_body_is_refused_not_forwarded_without_it() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        raw = await exchange_raw(
            port, post("/a", b"{}", b"Connection: Upgrade\r\nUpgrade: h2c\r\n"), wait=1
        )
        assert statuses(raw) == [400]
        assert b"upgrade request with a body" in raw
        assert echo.seen == []

    run(test)


def test_trailers_are_not_headers_and_two_hosts_are_refused() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        trailed = await exchange_raw(
            port,
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\nHost: evil\r\nX-Api-Key: k\r\n\r\n",
        )
        two_hosts = await exchange_raw(port, b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
        assert statuses(trailed) == [200]
        assert echo.seen[0].headers == [(b"host", b"x"), (b"transfer-encoding", b"chunked")]
        assert statuses(two_hosts) == [400]
        assert b"more than one Host" in two_hosts

    run(test)


def test_a_refusal_reaches_a_client_still_sending_its_body() -> None:
    """Closing with unread bytes would reset the connection and lose the 413."""

    def upload(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                for _ in range(16):
                    sock.sendall(b"u" * 65536)
            sock.settimeout(5)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    async def test(port: int, echo: Echo, _: Listener) -> None:
        answer = await asyncio.to_thread(upload, port)
        assert statuses(answer) == [413]

    run(test)


def test_a_client_that_stops_reading_is_disconnected_after_the_send_timeout() -> None:
    limits = ClientLimits(
        max_body_size=1000,
        header_timeout=5,
        body_timeout=5,
        keepalive_timeout=5,
        send_timeout=0.3,
    )

    async def test(port: int, echo: Echo, listener: Listener) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(1.0)
        assert echo.stopped == ["r0"]  # its handler was stopped: its slot would be free
        assert not listener.connections
        sock.close()

    run(test, limits)


def test_a_pipelined_expect_continue_gets_its_100_after_the_answer_before_it() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        echo.stall.set()
        first = await asyncio.wait_for(reader.readuntil(b"}"), 2)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert statuses(first) == [200]
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        second = await asyncio.wait_for(reader.readuntil(b"}"), 2)
        assert b'"body": "ok"' in second
        writer.close()

    run(test)


def test_answers_on_the_spot_and_by_task_keep_their_order_on_one_connection() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        raw = await exchange_raw(
            port,
            post("/a", b"1")
            + b"GET /quick/1 HTTP/1.1\r\nHost: x\r\n\r\n"
            + post("/b", b"2")
            + b"HEAD /quick/2 HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET /quick/3 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        assert statuses(raw) == [200] * 5
        order = [raw.index(part) for part in (b'"/a"', b"/quick/1", b'"/b"', b"/quick/3")]
        assert order == sorted(order)
        assert b"/quick/2" not in raw  # a HEAD answer: its head, no body
        assert [exchange.path for exchange in echo.seen] == ["/a", "/b"]

    run(test)


def test_a_bug_in_an_answer_on_the_spot_is_a_500_not_a_hang() -> None:
    async def test(port: int, echo: Echo, _: Listener) -> None:
        raw = await exchange_raw(port, b"GET /quick/boom HTTP/1.1\r\nHost: x\r\n\r\n", wait=2)
        assert statuses(raw) == [500]
        assert b"connection: close" in raw

    run(test)
