"""Upstreams made of raw sockets that misbehave on purpose, and a client side that keeps
what it is sent: the stand-ins the unit tests of the upstream connections share."""

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

from paddler.balancer.proxy.connections import ConnectionPool
from paddler.balancer.proxy.upstream import RetryableError, UpstreamFailedError, forward
from paddler.testbed.ports import free_port

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
HEADERS = [(b"host", b"upstream")]
Upstream = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Kept:
    """A client side that keeps what it is sent."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.ended = False

    def begin(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers = status, headers

    def send(self, chunk: bytes, last: bool = False) -> bool:
        self.body += chunk
        return True

    def when_drained(self, callback: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(callback)

    async def write(self, chunk: bytes) -> None:
        self.send(chunk)

    async def end(self) -> None:

        self.ended = True

    async def finish(self, chunk: bytes) -> None:
        self.send(chunk)
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


async def exchange(
    upstream: Upstream,
    requests: list[tuple[str, Kept]],
    *,
    pause: float = 0.05,
    keepalive: float = 5.0,
    read_timeout: float = 2.0,
) -> tuple[list[object], int, int]:
    """Send each request through forward() to ``upstream``, ``pause`` seconds apart (so
    that a closing upstream's FIN arrives): the outcomes (status or error), how many
    connections the upstream saw, and how many idle ones the pool kept."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await upstream(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the test ended it, or the proxy's side went away first
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    pool = ConnectionPool(1.0, keepalive)
    outcomes: list[object] = []
    try:
        for method, responder in requests:
            try:
                status = await forward(
                    pool,
                    f"127.0.0.1:{port}",
                    method,
                    "/v1/x",
                    HEADERS,
                    b"{}",
                    responder,
                    read_timeout,
                )
                outcomes.append(status)
            except (RetryableError, UpstreamFailedError) as error:
                outcomes.append(error)
            await asyncio.sleep(pause)
        idle = pool.idle_count()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
    return outcomes, connections, idle
