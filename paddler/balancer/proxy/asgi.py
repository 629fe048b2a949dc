"""Small ASGI helpers for the proxy's hot path (no framework objects per request)."""

import asyncio
import json
from typing import Any

from starlette.types import Receive, Send


class BodyTooLargeError(Exception):
    pass


class ClientDisconnectedError(Exception):
    pass


async def read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole request body, within ``limit`` bytes and ``timeout`` seconds."""

    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnectedError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # asyncio.timeout, not wait_for: no extra task per request on the hot path.
    async with asyncio.timeout(timeout):
        return await read()


async def send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_payload(message: str, kind: str, code: int) -> dict[str, Any]:
    """An error in the OpenAI shape, which llama.cpp also uses, so clients parse it."""
    return {"error": {"message": message, "type": kind, "code": code}}
