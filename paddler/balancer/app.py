"""The balancer's ASGI application: built in the Gunicorn master, attached in each worker.

One application serves both listeners and tells them apart by port: the
management API (Starlette) and the proxy (plain ASGI, for the hot path).
"""

import asyncio
import contextlib
import logging

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from paddler.balancer.fleet import Fleet
from paddler.balancer.management import management_routes
from paddler.balancer.proxy.handler import Proxy
from paddler.config import BalancerSettings

log = logging.getLogger("paddler.balancer")


def build_app(settings: BalancerSettings) -> ASGIApp:
    fleet = Fleet(settings)
    proxy = Proxy(fleet)
    management = Starlette(routes=management_routes(fleet))
    maintenance: list[asyncio.Task[None]] = []

    async def startup() -> None:
        # After fork, in the worker: its own table descriptor, HTTP pool and tasks.
        fleet.attach()
        await proxy.startup()
        maintenance.append(asyncio.create_task(fleet.maintain()))

    async def shutdown() -> None:
        for task in maintenance:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await proxy.shutdown()
        fleet.detach()

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await startup()
                except Exception as error:
                    log.exception("balancer worker cannot start")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            if server is not None and server[1] == settings.management_port:
                await management(scope, receive, send)
            else:
                await proxy(scope, receive, send)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send)

    return app
