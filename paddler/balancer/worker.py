"""The balancer's Gunicorn worker: Uvicorn's worker on uvloop, serving through the
balancer's own HTTP protocol.

Uvicorn runs the worker's event loop, its signals and the application's lifespan; both
of the worker's ports (the proxy and the management API) are served by proxy/http.py,
which bounds every request's head, body and idle time (Uvicorn alone does not stop a
client that trickles its headers). uvloop instead of asyncio: measured with
bench/proxy_overhead.py, it cut the proxy's CPU per request by about a quarter.
"""

import gc
import sys
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn import Server
from uvicorn_worker import UvicornWorker


class BalancerWorker(UvicornWorker):  # type: ignore[misc]
    """Uvicorn's worker, with the sockets handed to the balancer's own listeners."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
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
        app.management_sockets = [
            getattr(s, "sock", s).dup() for s in listeners if s.getsockname()[1] != proxy_port
        ]
        # Answers in flight get the master's grace, less a margin to close cleanly in.
        app.graceful_timeout = max(1.0, float(self.cfg.graceful_timeout) - 2.0)
        # UvicornWorker._serve, with no socket of Uvicorn's own: it runs the lifespan.
        self.config.app = app
        server = Server(config=self.config)
        self._install_sigquit_handler()
        # Everything alive now (modules, the app, the settings) lives as long as the
        # worker: out of the collector's sight, every full collection is shorter.
        gc.freeze()
        await server.serve(sockets=[])
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
