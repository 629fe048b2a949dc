"""Forwarding one request to one upstream with aiohttp, streaming the answer back.

aiohttp, not httpx, on this path: measured here (docs/performance.md), httpx cost
about 7 times the CPU per proxied request and collapsed at 32 concurrent
requests; httpx stays in the control plane (agents, tests).
"""

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp
from starlette.types import Send

# Hop-by-hop headers (RFC 9110 7.6.1), and what aiohttp sets itself.
HOP_BY_HOP = frozenset(
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
NOT_FORWARDED = HOP_BY_HOP | {b"content-length", b"expect"}
NOT_RETURNED = HOP_BY_HOP  # Server and Date pass through: the workers add neither


class RetryableError(Exception):
    """The upstream failed before it can have started work: another one may take it."""


class ConnectionDroppedError(RetryableError):
    """The connection closed before any answer: most often a kept-alive one that the
    upstream closed as it was reused, which says nothing about the upstream's health."""


class UpstreamFailedError(Exception):
    """The upstream failed after answering began: nothing can be retried."""


@dataclass(frozen=True)
class Outcome:
    status: int


def new_session(
    connect_timeout: float, read_timeout: float, keepalive_timeout: float
) -> aiohttp.ClientSession:
    # No pool limit: the balancer sends no more requests than there are free slots, and a
    # pool limit would be a second, hidden queue behind the explicit one.
    connector = (
        aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_timeout, ttl_dns_cache=60)
        if keepalive_timeout > 0
        else aiohttp.TCPConnector(limit=0, force_close=True, ttl_dns_cache=60)
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


CLIENT_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})


def _connection_tokens(raw: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers the client named in Connection: hop-by-hop as well (RFC 9110 7.6.1)."""
    return {
        token.strip().lower()
        for name, value in raw
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


def request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    request_id: str,
    host: str | None,
    keep_credentials: bool,
    upstream_api_key: str | None,
) -> list[tuple[str, str]]:
    """The client's headers as the upstream gets them.

    The client's own credentials go upstream only when the balancer neither checks
    keys of its own nor has the upstreams' key to send instead.
    """
    dropped = NOT_FORWARDED | {b"x-request-id"} | _connection_tokens(raw)
    if host is not None:
        dropped |= {b"host"}  # rewritten: the upstream's own address instead
    if not keep_credentials or upstream_api_key:
        dropped |= CLIENT_CREDENTIALS
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw
        if name.lower() not in dropped
    ]
    headers.append(("X-Request-Id", request_id))
    if upstream_api_key:
        headers.append(("Authorization", f"Bearer {upstream_api_key}"))
    if host is not None:
        headers.append(("Host", host))
    return headers


async def _response_head(
    session: aiohttp.ClientSession,
    url: str,
    method: str,
    body: bytes,
    headers: list[tuple[str, str]],
) -> aiohttp.ClientResponse:
    """The upstream's status line and headers, with failures sorted by what they mean."""
    try:
        return await session.request(
            method, url, data=body or None, headers=headers, allow_redirects=False
        )
    except aiohttp.ClientConnectorError as error:
        raise RetryableError(f"cannot connect: {error.os_error or error}") from None
    except aiohttp.ConnectionTimeoutError:
        raise RetryableError("cannot connect: timed out") from None
    except TimeoutError as error:
        # Before ClientConnectionError: aiohttp's ServerTimeoutError is both. Silence
        # is not a refusal; the upstream may be working on the request.
        raise UpstreamFailedError(f"no answer: {error or type(error).__name__}") from None
    except aiohttp.ServerDisconnectedError:
        # A kept-alive connection the upstream closed as it was reused, or an upstream
        # that died while reading the request: nothing was answered.
        raise ConnectionDroppedError("it closed the connection before answering") from None
    except aiohttp.ClientConnectionError as error:
        # Reset (ECONNRESET, EPIPE): the same race as above when the close crossed the
        # request on the wire, or a dying upstream. Nothing was answered either way.
        raise ConnectionDroppedError(f"the connection broke before an answer: {error}") from None
    except aiohttp.ClientError as error:
        raise UpstreamFailedError(f"no answer: {error or type(error).__name__}") from None


async def forward(
    session: aiohttp.ClientSession,
    url: str,
    method: str,
    body: bytes,
    headers: list[tuple[str, str]],
    send: Send,
    request_id: str,
    on_start: Callable[[int, str], Awaitable[None]] | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> Outcome:
    """Send the request, then pass the response on chunk by chunk as it arrives.

    Raises RetryableError for a failure before any response byte that means the
    upstream did no work (cannot connect, refused, llama.cpp's 503 while loading,
    the connection closed or reset before an answer), UpstreamFailedError for silence
    past the read timeout or a failure after the response started.
    """
    response = await _response_head(session, url, method, body, headers)
    fully_read = False
    try:
        if response.status == 503:
            await response.read()
            fully_read = True
            raise RetryableError("503: it is loading its model or overloaded")
        if on_start is not None:
            await on_start(response.status, response.content_type)
        out_headers = [
            (name.lower(), value)
            for name, value in response.raw_headers
            if name.lower() not in NOT_RETURNED
        ]
        out_headers.append((b"x-request-id", request_id.encode()))
        out_headers.extend(extra_headers or ())
        await send(
            {"type": "http.response.start", "status": response.status, "headers": out_headers}
        )
        try:
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamFailedError(
                f"it failed mid-response: {error or type(error).__name__}"
            ) from None
        fully_read = True
        await send({"type": "http.response.body", "body": b""})
        return Outcome(response.status)
    finally:
        # A response not read to its end (the client left, or it broke) must not go back
        # to the pool: closing the connection is also what tells llama.cpp to stop.
        if fully_read:
            response.release()
        else:
            response.close()
