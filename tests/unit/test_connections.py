"""The proxy's own upstream connections against raw sockets: streaming, reuse, failures."""

import asyncio
import gc
from collections.abc import Callable

import pytest

from paddler.balancer.proxy.connections import Answer
from paddler.balancer.proxy.upstream import UpstreamFailedError, _PassOn
from tests.unit.stand_in_upstreams import OK, Kept, exchange, read_request


class Slow(Kept):
    """A client whose socket buffer is full after the first chunk, for a while."""

    def __init__(self, pause: float, upstream_written: list[int]) -> None:
        super().__init__()
        self.pause = pause
        self.upstream_written = upstream_written
        self.written_when_drained = -1

    def send(self, chunk: bytes, last: bool = False) -> bool:
        first = not self.body
        super().send(chunk, last)
        return not first

    def when_drained(self, callback: Callable[[], None]) -> None:
        def drained() -> None:
            self.written_when_drained = self.upstream_written[0]
            callback()

        asyncio.get_running_loop().call_later(self.pause, drained)

    async def write(self, chunk: bytes) -> None:
        if not self.send(chunk):
            await asyncio.sleep(self.pause)
            self.written_when_drained = self.upstream_written[0]


def test_a_chunked_event_stream_arrives_whole_and_its_connection_is_reused() -> None:
    events = [f'data: {{"n": {n}}}\n\n'.encode() for n in range(20)]

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for event in events:
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.002)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await reader.read()

    first, second = Kept(), Kept()
    outcomes, connections, idle = asyncio.run(exchange(stream, [("POST", first), ("POST", second)]))
    assert outcomes == [200, 200]
    assert first.body == second.body == b"".join(events)
    assert first.ended
    assert second.ended
    assert (b"content-type", b"text/event-stream") in first.headers
    assert all(name != b"transfer-encoding" for name, _ in first.headers)  # hop-by-hop
    assert connections == 1
    assert idle == 1


def test_an_answer_saying_close_is_not_kept() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    outcomes, connections, idle = asyncio.run(
        exchange(closing, [("POST", Kept()), ("POST", Kept())])
    )
    assert outcomes == [200, 200]
    assert connections == 2
    assert idle == 0


def test_an_answer_cut_short_fails_mid_response() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()

    responder = Kept()
    outcomes, _, idle = asyncio.run(exchange(cut, [("POST", responder)]))
    assert isinstance(outcomes[0], UpstreamFailedError), outcomes
    assert "mid-response" in str(outcomes[0])
    assert responder.status == 200
    assert responder.body == b"only ten b"
    assert not responder.ended
    assert idle == 0


def test_a_malformed_answer_fails_and_is_not_kept() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SPDY/9 banana\r\n\r\n")
        await writer.drain()
        await reader.read()

    outcomes, _, idle = asyncio.run(exchange(garbage, [("POST", Kept())]))
    assert isinstance(outcomes[0], UpstreamFailedError), outcomes
    assert "malformed" in str(outcomes[0])
    assert idle == 0


def test_bytes_nobody_asked_for_retire_an_idle_connection() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        await reader.read()

    outcomes, connections, _ = asyncio.run(exchange(chatty, [("POST", Kept()), ("POST", Kept())]))
    assert outcomes == [200, 200]
    assert connections == 2  # the second request did not read the stray answer


def test_a_head_answer_has_no_body_even_with_a_length() -> None:
    async def head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
        await writer.drain()
        await reader.read()

    responder = Kept()
    outcomes, _, _ = asyncio.run(exchange(head, [("HEAD", responder)]))
    assert outcomes == [200]
    assert responder.ended
    assert responder.body == b""


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_slow_client_holds_the_upstream_back(framing: str) -> None:
    """While the client is behind the upstream is not read: only the kernel's socket
    buffers (and HIGH_WATER, for an answer of known length) fill in between. Streams
    are relayed from the read callback, answers of known length read by the task."""
    total = 32 * 1024 * 1024
    written = [0]

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"x" * 65536
        while written[0] < total:
            writer.write(block if framing == "length" else b"10000\r\n%s\r\n" % block)
            await writer.drain()
            written[0] += len(block)
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    responder = Slow(1.0, written)
    # Held back for longer than the read timeout: the upstream was not silent, we were.
    outcomes, _, _ = asyncio.run(exchange(flood, [("GET", responder)], read_timeout=0.5))

    assert outcomes == [200]
    assert len(responder.body) == total
    assert 0 < responder.written_when_drained < total // 2


def test_an_answer_ended_by_closing_is_whole_not_broken() -> None:
    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello, ")
        await writer.drain()
        writer.write(b"world")
        await writer.drain()

    responder = Kept()
    outcomes, _, idle = asyncio.run(exchange(close_delimited, [("POST", responder)]))
    assert outcomes == [200]
    assert responder.body == b"hello, world"
    assert responder.ended
    assert idle == 0


def test_an_idle_connection_the_upstream_closes_leaves_the_pool_at_once() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.01)  # then the upstream's own idle timeout closes it

    outcomes, _, idle = asyncio.run(exchange(hang_up, [("POST", Kept())]))
    assert outcomes == [200]
    assert idle == 0  # not still listed until the next request trips over it


def test_a_stream_that_goes_silent_fails_but_a_slow_steady_one_does_not() -> None:
    """The read timeout counts silence since the last bytes, not the answer's length."""
    events = [b'data: {"n": %d}\n\n' % n for n in range(6)]

    async def then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in events:  # 6 x 0.2 s: longer than the timeout in all
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)

    responder = Kept()
    outcomes, _, _ = asyncio.run(exchange(then_silence, [("POST", responder)], read_timeout=0.6))
    assert isinstance(outcomes[0], UpstreamFailedError), outcomes
    assert "mid-response" in str(outcomes[0])
    assert "silent" in str(outcomes[0])
    assert responder.body == b"".join(events)
    assert not responder.ended


WHOLE_STREAM = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'e\r\ndata: {"n":1}\n\r\n0\r\n\r\n'
)


@pytest.mark.parametrize(
    ("answer", "pieces"),
    [(OK, 1), (WHOLE_STREAM, 1), (WHOLE_STREAM, len(WHOLE_STREAM))],
    ids=["sized", "stream-in-one-read", "stream-byte-by-byte"],
)
def test_a_finished_answer_leaves_nothing_for_the_garbage_collector(
    answer: bytes, pieces: int
) -> None:
    """An answer that outlived its request in a reference cycle would wait for the
    garbage collector, whose passes then run in the request path (one per request, in
    callgrind's count: 3 % of a request's instructions)."""
    size = -(-len(answer) // pieces)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            for start in range(0, len(answer), size):
                writer.write(answer[start : start + size])
                await writer.drain()
        await reader.read()

    gc.collect()
    gc.disable()
    try:
        outcomes, _, _ = asyncio.run(exchange(upstream, [("POST", Kept()), ("POST", Kept())]))
        left = [thing for thing in gc.get_objects() if isinstance(thing, (Answer, _PassOn))]
    finally:
        gc.enable()
    assert outcomes == [200, 200]
    assert left == []
