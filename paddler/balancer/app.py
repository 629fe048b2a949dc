"""The balancer's application: built in the Gunicorn master, started in each worker.

Uvicorn runs each worker's event loop and the lifespan; the balancer's own HTTP
protocol (proxy/http.py) serves both ports on that loop, the proxy and the management
API. The worker hands both ports' sockets over before Uvicorn starts, and the lifespan
opens and closes them around the proxy's own start and stop.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from pathlib import Path

from starlette.types import Receive, Scope, Send

from paddler import __version__
from paddler.balancer.fleet import Fleet
from paddler.balancer.lease import LEASE_RETRY, ManagementLease
from paddler.balancer.management import MAX_REPORT_BYTES, Management
from paddler.balancer.proxy.handler import Proxy
from paddler.balancer.proxy.http import ClientLimits, Listener
from paddler.config import BalancerSettings
from paddler.config.addresses import parse_address
from paddler.config.model import counters_directory, management_lease_path
from paddler.metrics.counters import CounterFile
from paddler.metrics.recorder import Recorder
from paddler.metrics.statsd import StatsdSender
from paddler.tracing.otlp import Exporter

log = logging.getLogger("paddler.balancer")

# Seconds an idle client connection is kept open for its next request.
CLIENT_KEEPALIVE = 5.0


class BalancerApp:
    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        self.fleet = Fleet(settings)
        self.proxy = Proxy(self.fleet)
        self.management = Management(self.fleet)
        self.proxy_sockets: list[socket.socket] = []
        self.management_sockets: list[socket.socket] = []
        self.graceful_timeout = 30.0
        self._listeners: list[Listener] = []
        self._maintenance: list[asyncio.Task[None]] = []
        self._lease: ManagementLease | None = None

    async def startup(self) -> None:
        # After fork, in the worker: its own table descriptor, pool, tasks and listener.
        self.fleet.attach()
        # This process's own counter file; the master folds it away when the process ends.
        counters = CounterFile.create(
            Path(counters_directory(self.settings)) / f"{os.getpid()}.counters"
        )
        tracer = None
        if self.settings.otlp_traces_endpoint:
            tracer = Exporter(
                self.settings.otlp_traces_endpoint, self.settings.otlp_service_name, __version__
            )
            self._maintenance.append(asyncio.create_task(tracer.run()))
        await self.proxy.startup(Recorder(counters), tracer)
        self._maintenance.append(asyncio.create_task(self.fleet.maintain()))
        statsd = parse_address(self.settings.statsd_address or "")
        if statsd is not None:
            sender = StatsdSender(
                *statsd,
                self.settings.statsd_prefix,
                self.settings.statsd_interval,
                self.fleet.snapshot,
                counters,
            )
            self._maintenance.append(asyncio.create_task(sender.run()))
        limits = ClientLimits(
            max_body_size=self.settings.max_body_size,
            header_timeout=self.settings.header_timeout,
            body_timeout=self.settings.body_timeout,
            keepalive_timeout=CLIENT_KEEPALIVE,
            send_timeout=self.settings.send_timeout,
        )
        proxied = Listener(self.proxy.handle, limits)
        self._listeners.append(proxied)
        await proxied.start(self.proxy_sockets)
        # Reports are small: a body the size of a proxied prompt is refused unread.
        small = dataclasses.replace(limits, max_body_size=4 * MAX_REPORT_BYTES)
        management = Listener(self.management.handle, small, quick=self.management.answer_now)
        self._listeners.append(management)
        # One worker serves the management API (paddler/balancer/lease.py); the others
        # stand by to take over.
        self._lease = ManagementLease(Path(management_lease_path(self.settings)))
        self._maintenance.append(asyncio.create_task(self._serve_management(management)))

    async def _serve_management(self, listener: Listener) -> None:
        while not self._lease or not self._lease.take():
            await asyncio.sleep(LEASE_RETRY)
        log.info("worker %d serves the management API", os.getpid())
        await listener.start(self.management_sockets)

    async def shutdown(self) -> None:
        # Answers in flight finish first (up to the grace): the pool and table serve them.
        await asyncio.gather(
            *(listener.stop(self.graceful_timeout) for listener in self._listeners)
        )
        for task in self._maintenance:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._lease is not None:
            if not self._lease.held:
                for sock in self.management_sockets:
                    sock.close()  # a standby's copies, never handed to a server
            self._lease.close()
        await self.proxy.shutdown()
        self.fleet.detach()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Uvicorn serves no socket of its own here: the lifespan is all it brings.
        if scope["type"] == "lifespan":
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
