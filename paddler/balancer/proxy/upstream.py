"""Forwarding one request to one upstream, streaming the answer back as it arrives.

The connections are Paddler's own (connections.py); this module decides what goes
upstream, what comes back, and what a failure at each point means for a retry.
"""

from collections.abc import Callable, Iterable
from typing import Final, Protocol

from paddler.balancer.proxy.connections import (
    HOP_BY_HOP,
    Answer,
    BrokenAnswerError,
    ConnectFailedError,
    ConnectionPool,
    DroppedError,
    SilentError,
    UpstreamConnection,
    request_bytes,
)

NOT_FORWARDED: Final = HOP_BY_HOP | {b"content-length", b"expect"}


class RetryableError(Exception):
    """The upstream failed before it can have started work: another one may take it."""


class ConnectionDroppedError(RetryableError):
    """A new connection closed before any answer: the upstream took the request and
    let it go (it died, or refused more work)."""


class UpstreamFailedError(Exception):
    """The upstream failed after answering began, or stayed silent: nothing is retried."""


class Responder(Protocol):
    """Where the answer goes: the client's side of the proxy."""

    def begin(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The answer's status and headers (they go out with its first body bytes)."""
        ...

    def send(self, chunk: bytes, last: bool) -> bool:
        """Pass body bytes on at once (``last``: the answer ends with them); False when
        the client is behind and the sender should hold off until the callback given to
        when_drained runs."""
        ...

    def when_drained(self, callback: Callable[[], None]) -> None: ...

    async def write(self, chunk: bytes) -> None:
        """send(), then wait while the client is behind."""
        ...

    async def end(self) -> None: ...

    async def finish(self, chunk: bytes) -> None:
        """The answer's last bytes and its end, in one write: write() and end()."""
        ...


CLIENT_CREDENTIALS: Final = frozenset({b"authorization", b"x-api-key"})
_DROPPED_ALWAYS: Final = NOT_FORWARDED | {b"x-request-id"}


def _connection_tokens(raw: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers the client named in Connection: hop-by-hop as well (RFC 9110 7.6.1)."""
    return {
        token.strip().lower()
        for name, value in raw
        if name == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


def request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    request_id: str,
    host: str | None,
    keep_credentials: bool,
    upstream_api_key: str | None,
) -> list[tuple[bytes, bytes]]:
    """The client's headers (names in lower case) as the upstream gets them.

    ``host`` replaces the client's Host header when given; a request without one
    (HTTP/1.0) gets ``host`` or nothing. The client's own credentials go upstream only
    when the balancer neither checks keys of its own nor has the upstreams' key to
    send instead.
    """
    dropped = _DROPPED_ALWAYS
    if host is not None:
        dropped |= {b"host"}  # rewritten: the upstream's own address instead
    if not keep_credentials or upstream_api_key:
        dropped |= CLIENT_CREDENTIALS
    headers = []
    named_hop_by_hop = False
    for name, value in raw:
        if name not in dropped:
            headers.append((name, value))
        elif name == b"connection":
            named_hop_by_hop = True
    if named_hop_by_hop:
        tokens = _connection_tokens(raw)
        headers = [(name, value) for name, value in headers if name not in tokens]
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    if upstream_api_key:
        headers.append((b"authorization", b"Bearer " + upstream_api_key.encode("latin-1")))
    if host is not None:
        headers.append((b"host", host.encode("latin-1")))
    return headers


async def forward(
    pool: ConnectionPool,
    address: str,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    responder: Responder,
    read_timeout: float,
) -> int:
    """Send the request, then pass the answer on chunk by chunk as it arrives; its status.

    Raises RetryableError for a failure before any answer that means the upstream did
    no work (cannot connect, llama.cpp's 503 while loading, the connection closed or
    reset before the status line), UpstreamFailedError for silence past the read
    timeout or a failure after the answer began.
    """
    connection, answer = await _ask(
        pool, address, request_bytes(method, target, headers, body), method == "HEAD", read_timeout
    )
    try:
        if answer.status == 503:
            # Read it to its end so the connection can serve the next request.
            while await _rest(answer, read_timeout) is not None:
                pass
            raise RetryableError("503: it is loading its model or overloaded")
        # Hop-by-hop headers were left out as they came (Server and Date pass through:
        # the workers add neither).
        responder.begin(answer.status, answer.headers)
        if answer.sized and answer.complete:
            # Whole already: a JSON answer mostly comes in the read that brought its head.
            await responder.finish(answer.take())
        else:
            if answer.sized:
                # Of known length (a JSON answer, whole in one or two reads): taken as it
                # comes. A relay costs more to set up than it saves on so few reads.
                while (chunk := await _rest(answer, read_timeout)) is not None:
                    await responder.write(chunk)
            else:
                await _relay(answer, responder, read_timeout)
            await responder.end()

        return answer.status
    finally:
        # An answer not read to its end (the client left, or it broke) closes its
        # connection: that is also what tells llama.cpp to stop generating.
        connection.finished(answer)


async def _ask(
    pool: ConnectionPool, address: str, request: bytes, bodiless: bool, read_timeout: float
) -> tuple[UpstreamConnection, Answer]:
    """Send the request and wait for its answer's head.

    A kept-alive connection that closes before any answer is most often one the upstream
    let go just as the request went out (its idle timeout, a restart): nothing says it
    did any work, so the request goes again, once, on a new connection to the same
    upstream, as Go's and nginx's clients do. Only a new connection's drop counts
    against the upstream.
    """
    fresh = False
    while True:
        try:
            connection = (None if fresh else pool.idle(address)) or await pool.connect(address)
        except ConnectFailedError as failed:
            raise RetryableError(f"cannot connect: {failed}") from None
        answer = connection.send(request, bodiless)
        try:
            await answer.head(read_timeout)
        except DroppedError as dropped:
            connection.finished(answer)
            if dropped.reused and not fresh:
                fresh = True
                continue
            raise ConnectionDroppedError(
                f"the connection closed before an answer: {dropped}"
            ) from None
        except (SilentError, BrokenAnswerError) as broken:
            connection.finished(answer)
            raise UpstreamFailedError(f"no answer: {broken}") from None
        return connection, answer


class _PassOn:
    """What one read of a streamed answer brought, to the client, held back while the
    client is behind. (A class, not a closure: compiled, a closure and the scope it
    closes over refer to each other, a cycle per stream for the garbage collector.)"""

    __slots__ = ("answer", "responder")

    def __init__(self, answer: Answer, responder: Responder) -> None:
        self.answer = answer
        self.responder = responder

    def __call__(self, chunk: bytes, last: bool) -> None:
        if not self.responder.send(chunk, last):
            self.answer.hold()
            self.responder.when_drained(self.answer.release)


async def _relay(answer: Answer, responder: Responder, read_timeout: float) -> None:
    """A stream: each read of the upstream goes to the client from the read's own
    callback."""
    answer.relay(_PassOn(answer, responder))
    try:
        await answer.relayed(read_timeout)
    except (SilentError, BrokenAnswerError, DroppedError) as error:
        raise UpstreamFailedError(f"it failed mid-response: {error}") from None


async def _rest(answer: Answer, read_timeout: float) -> bytes | None:
    try:
        return await answer.body(read_timeout)
    except (SilentError, BrokenAnswerError, DroppedError) as error:
        raise UpstreamFailedError(f"it failed mid-response: {error}") from None
