"""The request line on a real slot table: order, timeouts, a full line, clients leaving."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from paddler.balancer.proxy.routing import eligible
from paddler.balancer.proxy.waiting import (
    Eligible,
    QueueFullError,
    QueueTimeoutError,
    SlotWaiter,
)
from paddler.slots import SlotTable, UpstreamReport, UpstreamState


@pytest.fixture
def table(tmp_path: Path) -> Iterator[SlotTable]:
    created = SlotTable.create(tmp_path / "slots", max_upstreams=4, max_owners=4, max_waiters=2)
    created.apply_report(
        UpstreamReport(
            "a", "a", "127.0.0.1", 1, UpstreamState.READY, 1, 1, 0, "m", "", "", 1, 3600.0
        ),
        time.monotonic(),
    )
    created.join()
    yield created
    created.close()


def policy() -> Eligible:
    return eligible(time.monotonic(), 3, None)


def test_waiters_get_freed_slots_first_in_first_out(table: SlotTable) -> None:
    async def run() -> list[str]:
        waiter = SlotWaiter(table)
        waiter.start()
        held, _ = await waiter.acquire(0, policy, timeout=1)
        order: list[str] = []

        async def wait(name: str) -> None:
            reservation, _ = await waiter.acquire(0, policy, timeout=5)
            order.append(name)
            await asyncio.sleep(0.01)
            table.release(reservation)
            waiter.released()

        first = asyncio.create_task(wait("first"))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(wait("second"))
        await asyncio.sleep(0.02)
        assert table.waiting() == 2
        table.release(held)
        waiter.released()
        await asyncio.gather(first, second)
        await waiter.stop()
        return order

    assert asyncio.run(run()) == ["first", "second"]
    assert table.waiting() == 0
    assert table.rows()[0].reservations == 0


def test_timeout_full_line_and_a_client_leaving_leave_no_ticket_behind(
    table: SlotTable,
) -> None:
    async def run() -> None:
        waiter = SlotWaiter(table)
        waiter.start()
        held, _ = await waiter.acquire(0, policy, timeout=1)
        with pytest.raises(QueueTimeoutError):
            await waiter.acquire(0, policy, timeout=0.05)
        assert table.waiting() == 0

        leaving = asyncio.create_task(waiter.acquire(0, policy, timeout=5))
        staying = asyncio.create_task(waiter.acquire(0, policy, timeout=5))
        await asyncio.sleep(0.02)
        assert table.waiting() == 2
        with pytest.raises(QueueFullError):
            await waiter.acquire(0, policy, timeout=5)
        leaving.cancel()  # what a client that disconnects while queued causes
        await asyncio.sleep(0.02)
        assert table.waiting() == 1
        table.release(held)
        waiter.released()
        reservation, _ = await staying
        table.release(reservation)
        await waiter.stop()

    asyncio.run(run())
    assert table.waiting() == 0
    assert table.rows()[0].reservations == 0
