"""The balancer's Gunicorn worker: Uvicorn, with a deadline for request headers.

Uvicorn alone does not stop a slowloris client: its keep-alive timer is reset by
every byte, and a connection that trickles its request line and headers holds
a slot of the server forever. Here every request's headers must be complete
within ``header_timeout`` seconds of their first byte (or of the connection),
or the connection is closed. Bodies have their own deadline in the proxy.
"""

import asyncio
import logging
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn_worker import UvicornWorker

log = logging.getLogger("paddler.balancer")


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_deadline is not None and self.conn.their_state in (
            h11.SEND_BODY,
            h11.DONE,
            h11.MUST_CLOSE,
            h11.CLOSED,
            h11.ERROR,
        ):
            self._disarm()

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
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "auto",
        "http": HeaderDeadlineProtocol,
        "server_header": False,
        "date_header": False,
    }
