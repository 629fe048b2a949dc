"""How a failure before the upstream's answer is sorted: retry elsewhere, retry here, or fail.

The upstreams here are raw sockets that misbehave on purpose; what llama-server itself
does when killed is covered in tests/integration/test_proxy.py.
"""

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from paddler.balancer.proxy.connections import ConnectionPool
from paddler.balancer.proxy.handler import _Retries
from paddler.balancer.proxy.upstream import (
    ConnectionDroppedError,
    RetryableError,
    UpstreamFailedError,
    forward,
)
from paddler.testbed.ports import free_port

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
HEADERS = [(b"host", b"upstream")]
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Kept:
    """A client side that keeps what it is sent."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.ended = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers = status, headers

    async def write(self, chunk: bytes) -> None:
        self.body += chunk

    async def end(self) -> None:
        self.ended = True


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN, as a socket closed with unread data does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def send_through(
    behaviour: Behaviour, requests: int = 1, pause: float = 0.0, keepalive: float = 4.0
) -> tuple[list[object], int]:
    """What forward() made of each request, and how many connections the upstream saw."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    pool = ConnectionPool(1.0, keepalive)
    outcomes: list[object] = []
    try:
        for index in range(requests):
            if index:
                await asyncio.sleep(pause)
            try:
                outcome = await forward(
                    pool, f"127.0.0.1:{port}", "POST", "/completion", HEADERS, b"{}", Kept(), 0.5
                )
                outcomes.append(outcome.status)
            except (RetryableError, UpstreamFailedError) as error:
                outcomes.append(error)
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
    return outcomes, connections


def test_a_connection_closed_before_the_answer_is_dropped_not_failed() -> None:
    async def close_unanswered(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)

    outcomes, _ = asyncio.run(send_through(close_unanswered))
    assert isinstance(outcomes[0], ConnectionDroppedError), outcomes


def test_a_connection_reset_before_the_answer_is_dropped_not_failed() -> None:
    async def reset_unanswered(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        reset(w)

    outcomes, _ = asyncio.run(send_through(reset_unanswered))
    assert isinstance(outcomes[0], ConnectionDroppedError), outcomes


def test_a_kept_alive_connection_closed_as_it_is_reused_is_dropped_not_failed() -> None:
    """The race the keep-alive timeout avoids: the upstream closes the idle connection
    just as the next request goes out on it."""

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)
        reset(writer)

    outcomes, connections = asyncio.run(send_through(answer_once, requests=2))
    assert outcomes[0] == 200
    assert isinstance(outcomes[1], ConnectionDroppedError), outcomes
    assert connections == 1  # the second request did go out on the kept-alive connection


@pytest.mark.parametrize(("keepalive", "expected"), [(0.2, 2), (5.0, 1)])
def test_idle_connections_are_let_go_after_the_keepalive_timeout(
    keepalive: float, expected: int
) -> None:
    async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()

    outcomes, connections = asyncio.run(
        send_through(keep_answering, requests=2, pause=0.6, keepalive=keepalive)
    )
    assert outcomes == [200, 200]
    assert connections == expected


def test_no_listener_is_retryable_elsewhere() -> None:
    async def run() -> object:
        pool = ConnectionPool(1.0, 4.0)
        try:
            await forward(pool, f"127.0.0.1:{free_port()}", "POST", "/", HEADERS, b"", Kept(), 0.5)
        except RetryableError as error:
            return error
        finally:
            pool.close()
        return None

    error = asyncio.run(run())
    assert isinstance(error, RetryableError)
    assert not isinstance(error, ConnectionDroppedError)
    assert "cannot connect" in str(error)


def test_silence_past_the_read_timeout_fails_without_a_retry() -> None:
    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(2)

    outcomes, _ = asyncio.run(send_through(say_nothing))
    assert isinstance(outcomes[0], UpstreamFailedError), outcomes
    assert "no answer" in str(outcomes[0])


def test_a_503_is_retryable_elsewhere() -> None:
    async def loading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\n\r\nloading")
        await writer.drain()

    outcomes, _ = asyncio.run(send_through(loading))
    assert isinstance(outcomes[0], RetryableError), outcomes
    assert not isinstance(outcomes[0], ConnectionDroppedError)


def test_one_dropped_connection_is_forgiven_and_costs_no_attempt() -> None:
    retries = _Retries(max_retries=1)
    dropped = ConnectionDroppedError("closed")
    assert retries.left()
    assert retries.forgives(dropped)
    assert retries.left()  # the forgiven attempt was given back
    assert not retries.forgives(dropped)  # only once per request
    assert retries.left()  # the one retry
    assert not retries.left()


def test_other_failures_are_never_forgiven() -> None:
    retries = _Retries(max_retries=0)
    assert retries.left()
    assert not retries.forgives(RetryableError("cannot connect"))
    assert not retries.left()
