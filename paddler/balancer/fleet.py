"""One balancer worker's handle on the slot table, attached after fork."""

import asyncio
import logging
import time
from pathlib import Path

from paddler.balancer.proxy.affinity import REMEMBERING
from paddler.config import BalancerSettings
from paddler.config.model import prefix_index_path, slot_table_path
from paddler.metrics.demand import demand
from paddler.metrics.exposition import FleetSnapshot, Learned
from paddler.prefixes.index import PrefixIndex
from paddler.slots import SlotTable, UpstreamRow, UpstreamState
from paddler.slots.view import state_name

log = logging.getLogger("paddler.balancer")

MAINTENANCE_INTERVAL = 0.5


class Fleet:
    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        self._table: SlotTable | None = None
        # The prefix index of the policies that keep one: the proxy's, and what
        # cache_aware learned, for the gauges.
        self.index: PrefixIndex | None = None

    @property
    def table(self) -> SlotTable:
        if self._table is None:
            raise RuntimeError("the slot table is attached in the worker's lifespan")
        return self._table

    def attach(self) -> None:
        """Open the table with this process's own descriptor (never one inherited by fork)."""
        self._table = SlotTable.open(Path(slot_table_path(self.settings)))
        self._table.join()
        if self.settings.routing_policy in REMEMBERING:
            self.index = PrefixIndex.open(Path(prefix_index_path(self.settings)))

    def detach(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None
        if self.index is not None:
            self.index.close()
            self.index = None

    def state_name(self, row: UpstreamRow, now: float) -> str:
        return state_name(row, now, self.settings.missed_reports)

    def snapshot(self) -> FleetSnapshot:
        """The fleet as the gauges (Prometheus, StatsD, autoscaling) describe it now."""
        now = time.monotonic()
        rows = self.table.rows()
        queued = self.table.waiting()
        return FleetSnapshot(
            rows=rows,
            states={row.index: self.state_name(row, now) for row in rows},
            queued=queued,
            oldest_wait=self.table.oldest_wait(now),
            demand=demand(rows, queued, now, self.settings.missed_reports),
            now=now,
            learned=self._learned(),
        )

    def _learned(self) -> Learned | None:
        index = self.index
        if index is None or self.settings.routing_policy != "cache_aware":
            return None  # (session learns nothing)
        return Learned(index.copy_trust, index.host_trust, index.prefill_rate)

    async def maintain(self) -> None:
        """Forget silent upstreams and reclaim dead processes' reservations, forever.

        Every worker runs this; each step is idempotent under the table's lock, so
        it does not matter which worker gets there first.
        """
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                settings = self.settings
                now = time.monotonic()
                for row in self.table.expire(now, settings.forget_after, settings.missed_reports):
                    log.info(
                        "forgot upstream %s (%s): %s",
                        row.name,
                        row.address,
                        "its agent stopped"
                        if row.state is UpstreamState.REMOVED
                        else f"no report for {row.age(now):.0f}s",
                    )
                reclaimed = self.table.reclaim_dead_owners()
                if reclaimed:
                    log.warning(
                        "released the reservations of %d dead balancer process(es)", reclaimed
                    )
            except Exception:
                log.exception("slot table maintenance failed; retrying")
