"""The management API: agents report here, operators and paddlerctl read the fleet."""

import hmac
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from paddler.balancer.fleet import Fleet
from paddler.reports import ReportError, parse_report
from paddler.slots import Applied, SlotTableError
from paddler.slots.view import describe

log = logging.getLogger("paddler.balancer")

MAX_REPORT_BYTES = 65536


def management_routes(fleet: Fleet) -> list[Route]:
    token = fleet.settings.management_token
    expected = f"Bearer {token}".encode() if token else None

    def refused(request: Request) -> Response | None:
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        client = request.client.host if request.client else "?"
        log.warning(
            "refused %s %s from %s: missing or wrong bearer token",
            request.method,
            request.url.path,
            client,
        )
        return JSONResponse(
            {"error": "missing or wrong bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_agents(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        now = time.monotonic()
        agents = [describe(row, now, fleet.settings.missed_reports) for row in fleet.table.rows()]
        return JSONResponse({"agents": agents})

    async def report(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        body = await request.body()
        if len(body) > MAX_REPORT_BYTES:
            return _bad(f"the report is larger than {MAX_REPORT_BYTES} bytes", 413)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _bad(f"the report is not valid JSON: {error}")
        try:
            parsed = parse_report(request.path_params["agent_id"], payload)
        except ReportError as error:
            return _bad(str(error))
        try:
            applied = fleet.table.apply_report(parsed, time.monotonic())
        except SlotTableError as error:
            log.error("cannot take the report of %s: %s", parsed.name, error)
            return _bad(str(error), 503)
        if applied is Applied.NEW:
            log.info(
                "upstream %s (%s:%d) joined: %s, %d slots",
                parsed.name,
                parsed.host,
                parsed.port,
                parsed.state.name.lower(),
                parsed.slots_total,
            )
        return JSONResponse({"accepted": applied is not Applied.IGNORED, "applied": applied.value})

    async def remove(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        row = fleet.table.remove_agent(request.path_params["agent_id"])
        if row is not None:
            log.info("upstream %s (%s) left: its agent stopped", row.name, row.address)
        return JSONResponse({"removed": row is not None})

    return [
        Route("/health", health, methods=["GET"]),
        Route("/api/v1/agents", list_agents, methods=["GET"]),
        Route("/api/v1/agents/{agent_id}", report, methods=["PUT"]),
        Route("/api/v1/agents/{agent_id}", remove, methods=["DELETE"]),
    ]


def _bad(message: str, status: int = 400) -> Response:
    return JSONResponse({"error": message}, status_code=status)
