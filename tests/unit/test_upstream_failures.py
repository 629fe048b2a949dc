"""How a failure before the upstream's answer is sorted: retry elsewhere, retry here, or fail.

The upstreams here are raw sockets that misbehave on purpose; what llama-server itself
does when killed is covered in tests/integration/test_proxy.py.
"""

import asyncio

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
from tests.unit.stand_in_upstreams import (
    HEADERS,
    OK,
    Kept,
    Upstream,
    exchange,
    read_request,
    reset,
)


async def send_through(
    upstream: Upstream, requests: int = 1, pause: float = 0.05, keepalive: float = 4.0
) -> tuple[list[object], int]:
    """What forward() made of each of ``requests`` POSTs, and the connections seen."""
    outcomes, connections, _ = await exchange(
        upstream,
        [("POST", Kept()) for _ in range(requests)],
        pause=pause,
        keepalive=keepalive,
        read_timeout=0.5,
    )
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


def test_a_kept_alive_connection_closed_as_it_is_reused_sends_again_on_a_new_one() -> None:
    """The race the keep-alive timeout narrows but cannot close: the upstream lets the
    idle connection go just as the next request goes out on it. Nothing says the
    upstream did any work, so the request goes again on a new connection, uncounted."""
    requests_seen = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests_seen
        await read_request(reader)
        requests_seen += 1
        writer.write(OK)
        await writer.drain()
        await read_request(reader)
        requests_seen += 1
        reset(writer)

    outcomes, connections = asyncio.run(send_through(answer_once, requests=2))
    assert outcomes == [200, 200]
    assert connections == 2  # the second request was answered on a connection of its own
    assert requests_seen == 3  # ...after going out on the kept-alive one first


def test_a_new_connection_closed_before_the_answer_after_a_reused_one_fails() -> None:
    """Sent again once only: when the new connection drops as well, the upstream is to
    blame and the request goes elsewhere."""

    async def answer_first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if not answered:
            answered.append(True)
            writer.write(OK)
            await writer.drain()
            await read_request(reader)
        reset(writer)

    answered: list[bool] = []
    outcomes, connections = asyncio.run(send_through(answer_first_only, requests=2))
    assert outcomes[0] == 200
    assert isinstance(outcomes[1], ConnectionDroppedError), outcomes
    assert "on a new connection" in str(outcomes[1])
    assert connections == 2


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


def test_a_request_gets_one_attempt_more_than_its_retries() -> None:
    retries = _Retries(max_retries=1)
    assert retries.left()
    assert retries.left()
    assert not retries.left()
