"""Waiting for a slot: one line, first in first out, across every balancer worker.

The line itself is in the slot table (tickets), so the oldest request of the whole
balancer gets the next free slot, whichever worker holds it. Each worker runs one
pump that offers freed slots to its own waiters in ticket order, woken by its own
releases at once and by polling for everyone else's.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from paddler.slots import Reservation, SlotTable, UpstreamRow
from paddler.slots.policy import Policy

log = logging.getLogger("paddler.balancer")

POLL_INTERVAL: Final = 0.005

Eligible = Policy
Granted = tuple[Reservation, UpstreamRow]


class QueueFullError(Exception):
    pass


class QueueTimeoutError(Exception):
    pass


@dataclass(order=True)
class _Waiter:
    ticket: int
    model_key: int = field(compare=False)
    eligible: Callable[[], Eligible] = field(compare=False)
    granted: asyncio.Future[Granted] = field(compare=False)
    # A retry that excludes upstreams it tried: its refusal says nothing about others'.
    partial: bool = field(compare=False, default=False)


class SlotWaiter:
    def __init__(self, table: SlotTable) -> None:
        self.table = table
        self._waiters: list[_Waiter] = []
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def released(self) -> None:
        """A slot of ours just freed: offer it to the line now, not at the next poll."""
        if self._waiters:
            self._wake.set()

    def take(self, model_key: int, policy: Eligible) -> Granted | None:
        """A slot now, if one is free for a request that is not in line (and none of the
        line's could take it): no task switch for the common case."""
        return self.table.acquire(model_key, policy)

    async def acquire(
        self,
        model_key: int,
        eligible: Callable[[], Eligible],
        timeout: float,
        partial: bool = False,
    ) -> Granted:
        """take() or wait(), in one call (the handler calls the two itself, so that a free
        slot costs it no coroutine)."""
        granted = self.take(model_key, eligible())
        if granted is not None:
            return granted
        return await self.wait(model_key, eligible, timeout, partial)

    async def wait(
        self,
        model_key: int,
        eligible: Callable[[], Eligible],
        timeout: float,
        partial: bool = False,
    ) -> Granted:
        """Wait in line for a slot (after take() found none)."""
        ticket = self.table.enqueue(model_key, time.monotonic())
        if ticket is None:
            raise QueueFullError
        waiter = _Waiter(
            ticket, model_key, eligible, asyncio.get_running_loop().create_future(), partial
        )
        self._waiters.append(waiter)
        self._waiters.sort()
        self._wake.set()
        delivered = False
        try:
            granted = await asyncio.wait_for(asyncio.shield(waiter.granted), timeout)
            delivered = True
            return granted
        except TimeoutError:
            raise QueueTimeoutError from None
        finally:
            self._waiters.remove(waiter)
            if not waiter.granted.done():
                waiter.granted.cancel()
                self.table.leave(ticket)
            elif not delivered:
                # Granted in the very moment the client left or time ran out: hand it back.
                self.table.release(waiter.granted.result()[0])
                self.released()

    async def _run(self) -> None:
        while True:
            if self._waiters:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
            else:
                await self._wake.wait()  # idle: no polling while nobody here waits
            self._wake.clear()
            if not self._waiters:
                continue
            try:
                self._offer()
            except Exception:
                # A pump that died would leave every waiter of this worker to time out.
                log.exception("offering free slots to waiting requests failed; retrying")

    def _offer(self) -> None:
        refused: set[int] = set()
        for waiter in list(self._waiters):
            if waiter.granted.done() or waiter.model_key in refused:
                continue
            granted = self.table.acquire(waiter.model_key, waiter.eligible(), waiter.ticket)
            if granted is not None:
                waiter.granted.set_result(granted)
            elif not waiter.partial:
                refused.add(waiter.model_key)  # younger waiters of that model: no chance
