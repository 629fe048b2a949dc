"""The floor of a proxy in Python on this machine: uvloop and httptools, and nothing else.

    python bench/bare_proxy.py PORT WORKERS UPSTREAM_PORT [UPSTREAM_PORT ...]

Keep-alive on both sides, upstreams taken in turn, answers passed on as they arrive
(streams re-chunked, as Paddler does). No slot, no queue, no retry, no timeout, no
metrics, no header rules: what no Python proxy can do for less, measured by
bench/floor.py against nginx under the same load as Paddler's Part 1 cells. Only for
benchmarks.
"""

import asyncio
import itertools
import os
import socket
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list["Upstream"]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[bytes] = []
        self.chunked = False
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # What one read brought goes to the client in one write, as Paddler does.
        client = self.client
        self.parser.feed_data(data)
        if self.out and client is not None and client.transport is not None:
            client.transport.write(b"".join(self.out))
        self.out.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()

    def on_message_begin(self) -> None:
        self.headers = [b"HTTP/1.1 %d OK" % 200]
        self.chunked = True

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length":
            self.chunked = False
        if lower not in (b"transfer-encoding", b"connection"):
            self.headers.append(name + b": " + value)

    def on_headers_complete(self) -> None:
        self.headers[0] = b"HTTP/1.1 %d OK" % self.parser.get_status_code()
        if self.chunked:
            self.headers.append(b"transfer-encoding: chunked")
        self.out.append(b"\r\n".join(self.headers) + b"\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        self.out.append(body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.client = None
        self.parser = httptools.HttpResponseParser(self)
        self.pool.append(self)


class Client(asyncio.Protocol):
    def __init__(self, ports: "itertools.cycle[int]", pools: dict[int, list[Upstream]]) -> None:
        self.ports = ports
        self.pools = pools
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"content-length", b"connection"):
            self.headers.append(name + b": " + value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        method = self.parser.get_method()
        head = [method + b" " + self.url + b" HTTP/1.1", *self.headers]
        head.append(b"content-length: %d" % len(body))
        request = b"\r\n".join(head) + b"\r\n\r\n" + body
        port = next(self.ports)
        pool = self.pools[port]
        if pool:
            self.send(pool.pop(), request)
        else:
            asyncio.get_running_loop().create_task(self.connect(port, pool, request))

    async def connect(self, port: int, pool: list[Upstream], request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(pool), "127.0.0.1", port)
        self.send(upstream, request)

    def send(self, upstream: Upstream, request: bytes) -> None:
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(request)


def serve(sock: socket.socket, ports: list[int]) -> None:
    uvloop.install()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        turn = itertools.cycle(ports)
        pools: dict[int, list[Upstream]] = {port: [] for port in ports}
        server = await loop.create_server(lambda: Client(turn, pools), sock=sock, backlog=2048)
        await server.serve_forever()

    asyncio.run(main())


def run() -> None:
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    ports = [int(value) for value in sys.argv[3:]]
    sock = socket.create_server(("127.0.0.1", port), backlog=2048)
    sock.setblocking(False)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            serve(sock, ports)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    run()
