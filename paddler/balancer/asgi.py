"""An ASGI application served over the balancer's own HTTP connections (proxy/http.py).

The management port is served by the same protocol as the proxy port; its routes that
are not hot (health, the agents' list, an agent's removal) stay a Starlette application,
and this hands each whole request to it as ASGI's "http" scope.
"""

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message

from paddler.balancer.proxy.http import Exchange


async def serve_asgi(app: ASGIApp, exchange: Exchange) -> None:
    path, _, query = exchange.target.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1" if exchange.http11 else "1.0",
        "method": exchange.method,
        "scheme": "http",
        "path": exchange.path,
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": exchange.headers,
        "client": exchange.client(),
        "server": None,
    }
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": exchange.body, "more_body": False}
        # The request was whole before the app began: nothing more comes. A client that
        # leaves cancels this task, as Uvicorn's disconnect would end the app's wait.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("not reached")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(bytes(name).lower(), bytes(value)) for name, value in message["headers"]]
            await exchange.start(message["status"], headers)
        elif message["type"] == "http.response.body":
            await exchange.write(message.get("body", b""))
            if not message.get("more_body", False):
                await exchange.end()

    await app(scope, receive, send)
