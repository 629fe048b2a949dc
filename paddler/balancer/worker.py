"""The balancer's Gunicorn worker: Uvicorn on uvloop and httptools, with a header deadline.

Uvicorn serves the management API; the proxy port goes to the proxy's own listener
(proxy/http.py), which applies the same deadline to its clients.

Uvicorn alone does not stop a slowloris client: its keep-alive timer is reset by
every byte, and a connection that trickles its request line and headers holds a
slot of the server forever. Here every request's headers must be complete within
``header_timeout`` seconds of the connection or of the request's first byte, or
the connection is closed. Bodies have their own deadline in the proxy.

uvloop and httptools instead of asyncio and h11: measured with bench/proxy_overhead.py,
they cut the proxy's CPU per request by about a quarter.
"""

import asyncio
import gc
import logging
import sys
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn import Server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

log = logging.getLogger("paddler.balancer")


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm()  # the first byte of the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info(
                "closed the connection of %s: its request headers took over %gs",
                client,
                self.header_timeout,
            )
            self.transport.close()


class BalancerWorker(UvicornWorker):  # type: ignore[misc]
    """Uvicorn for the management API; the proxy's sockets go to the proxy's listener."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
        "http": HeaderDeadlineProtocol,
        "server_header": False,
        "date_header": False,
        # No X-Forwarded-* rewriting of the client address: the API does not use it.
        "proxy_headers": False,
    }

    async def _serve(self) -> None:
        app = self.wsgi
        proxy_port = app.settings.reverseproxy_port
        # Gunicorn's socket wrappers. Both servers get duplicates of the sockets inside:
        # closing a server closes its sockets, and Gunicorn closes its own afterwards
        # ("Error while closing socket: Bad file descriptor" at every stop otherwise).
        listeners: list[Any] = self.sockets
        app.proxy_sockets = [
            getattr(s, "sock", s).dup() for s in listeners if s.getsockname()[1] == proxy_port
        ]
        management = [
            getattr(s, "sock", s).dup() for s in listeners if s.getsockname()[1] != proxy_port
        ]
        # Answers in flight get the master's grace, less a margin to close cleanly in.
        app.graceful_timeout = max(1.0, float(self.cfg.graceful_timeout) - 2.0)
        # UvicornWorker._serve, with the management sockets only.
        self.config.app = app
        server = Server(config=self.config)
        self._install_sigquit_handler()
        # Everything alive now (modules, the app, the settings) lives as long as the
        # worker: out of the collector's sight, every full collection is shorter.
        gc.freeze()
        await server.serve(sockets=management)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
