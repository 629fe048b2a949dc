"""The balancer's ASGI application, built in the Gunicorn master, attached in each worker."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from paddler.balancer.fleet import Fleet
from paddler.balancer.management import management_routes
from paddler.config import BalancerSettings


def build_app(settings: BalancerSettings) -> Starlette:
    fleet = Fleet(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fleet.attach()
        maintenance = asyncio.create_task(fleet.maintain())
        try:
            yield
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            fleet.detach()

    return Starlette(routes=management_routes(fleet), lifespan=lifespan)
