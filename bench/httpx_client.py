"""httpx as the proxy's upstream client, for comparing it with aiohttp inside Paddler.

bench/proxy_overhead.py --arms paddler-httpx starts the balancer through this module,
which swaps the proxy's forwarding function and connection pool for httpx ones before
the balancer starts. Nothing else differs. Benchmarks only: Paddler ships aiohttp.
"""

import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paddler.balancer.proxy import handler
from paddler.balancer.proxy.upstream import (
    NOT_RETURNED,
    Outcome,
    RetryableError,
    UpstreamFailedError,
)


class Session(httpx.AsyncClient):
    async def close(self) -> None:
        await self.aclose()


def new_session(connect_timeout: float, read_timeout: float) -> Session:
    return Session(
        timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=None, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
    )


async def forward(
    session: Session,
    url: str,
    method: str,
    body: bytes,
    headers: list[tuple[str, str]],
    send: Any,
    request_id: str,
    on_start: Any = None,
    extra_headers: Any = None,
) -> Outcome:
    request = session.build_request(method, url, content=body or None, headers=headers)
    try:
        response = await session.send(request, stream=True)
    except httpx.ConnectError as error:
        raise RetryableError(f"cannot connect: {error}") from None
    except httpx.HTTPError as error:
        raise UpstreamFailedError(f"no answer: {error}") from None
    try:
        if response.status_code == 503:
            await response.aread()
            raise RetryableError("503")
        content_type = response.headers.get("content-type", "").split(";")[0]
        if on_start is not None:
            await on_start(response.status_code, content_type)
        out = [
            (name.lower(), value)
            for name, value in response.headers.raw
            if name.lower() not in NOT_RETURNED
        ]
        out.append((b"x-request-id", request_id.encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return Outcome(response.status_code)
    finally:
        await response.aclose()


def main() -> int:
    handler.new_session = new_session  # type: ignore[assignment]
    handler.forward = forward  # type: ignore[assignment]
    from paddler.cli import main as paddler_main  # noqa: PLC0415 - after the swap

    return paddler_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
