"""The balancer's application: built in the Gunicorn master, started in each worker.

Uvicorn serves the management API (Starlette) and runs the lifespan; the proxy's
own listener (proxy/http.py) serves the proxy port on the same event loop. The
worker hands the proxy's sockets over before Uvicorn starts, and the lifespan opens
and closes them around the proxy's own start and stop.
"""

import asyncio
import contextlib
import logging
import socket

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from paddler.balancer.fleet import Fleet
from paddler.balancer.management import REPORTS_PATH, Management
from paddler.balancer.proxy.handler import Proxy
from paddler.balancer.proxy.http import ClientLimits, ProxyListener
from paddler.config import BalancerSettings

log = logging.getLogger("paddler.balancer")

# Seconds an idle client connection is kept open for its next request.
CLIENT_KEEPALIVE = 5.0


class BalancerApp:
    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        self.fleet = Fleet(settings)
        self.proxy = Proxy(self.fleet)
        self.reports = Management(self.fleet)
        self.management = Starlette(routes=self.reports.routes())
        self.proxy_sockets: list[socket.socket] = []
        self.graceful_timeout = 30.0
        self._listener: ProxyListener | None = None
        self._maintenance: list[asyncio.Task[None]] = []

    async def startup(self) -> None:
        # After fork, in the worker: its own table descriptor, pool, tasks and listener.
        self.fleet.attach()
        await self.proxy.startup()
        self._maintenance.append(asyncio.create_task(self.fleet.maintain()))
        limits = ClientLimits(
            max_body_size=self.settings.max_body_size,
            header_timeout=self.settings.header_timeout,
            body_timeout=self.settings.body_timeout,
            keepalive_timeout=CLIENT_KEEPALIVE,
            send_timeout=self.settings.send_timeout,
        )
        self._listener = ProxyListener(self.proxy.handle, limits)
        await self._listener.start(self.proxy_sockets)

    async def shutdown(self) -> None:
        # Answers in flight finish first (up to the grace): the pool and table serve them.
        if self._listener is not None:
            await self._listener.stop(self.graceful_timeout)
        for task in self._maintenance:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.proxy.shutdown()
        self.fleet.detach()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "PUT" and scope["path"].startswith(REPORTS_PATH):
                await self.reports.report(scope, receive, send)
            else:
                await self.management(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as error:
                    log.exception("balancer worker cannot start")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
