"""The management API: agents report here, operators and paddlerctl read the fleet."""

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from paddler.balancer import dashboard
from paddler.balancer.asgi import serve_asgi
from paddler.balancer.fleet import Fleet
from paddler.balancer.proxy.http import Exchange
from paddler.config.model import counters_directory
from paddler.metrics import counters, exposition
from paddler.metrics.traffic import totals
from paddler.reports import ReportError, parse_report
from paddler.slots import Applied, SlotTableError
from paddler.slots.view import describe

log = logging.getLogger("paddler.balancer")

MAX_REPORT_BYTES = 65536


class Management:
    """The management API. Agents' reports, a thousand a second in a big fleet, are
    taken straight from the balancer's own HTTP protocol (under Uvicorn and Starlette
    the HTTP around a report cost four times the report's own work, and a fleet of a
    thousand agents a third of a core); the rest is Starlette."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        token = fleet.settings.management_token
        self._expected = f"Bearer {token}".encode() if token else None
        self.app = Starlette(routes=self.routes())

    def authorized(self, given: bytes) -> bool:
        return self._expected is None or hmac.compare_digest(given, self._expected)

    def log_refused(self, method: str, path: str, client: str) -> None:
        log.warning("refused %s %s from %s: missing or wrong bearer token", method, path, client)

    # -- reports, answered on the spot ----------------------------------------------------

    def answer_now(self, exchange: Exchange) -> bool:
        """An agent's report, answered at once from the connection's own callback (no
        task: nothing here waits); False for anything else, which handle() serves."""
        if exchange.method != "PUT" or not exchange.path.startswith(REPORTS_PATH):
            return False
        if not self.authorized(exchange.header(b"authorization") or b""):
            client = exchange.client()
            self.log_refused("PUT", exchange.path, client[0] if client else "?")
            exchange.answer(401, _REFUSED, [(b"www-authenticate", b"Bearer")])
            return True
        if len(exchange.body) > MAX_REPORT_BYTES:
            exchange.answer(413, _TOO_LARGE)
            return True
        status, answer = self._apply(exchange.path[len(REPORTS_PATH) :], exchange.body)
        exchange.answer(
            status, answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        )
        return True

    # -- everything else, with Starlette ---------------------------------------------------

    async def handle(self, exchange: Exchange) -> None:
        await serve_asgi(self.app, exchange)

    def _apply(self, agent_id: str, body: bytes) -> tuple[int, dict[str, Any] | bytes]:
        try:
            payload = json.loads(body.decode())  # UTF-8 (RFC 8259 8.1): no guessing
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return 400, {"error": f"the report is not valid JSON: {error}"}
        try:
            parsed = parse_report(agent_id, payload)
        except ReportError as error:
            return 400, {"error": str(error)}
        try:
            applied = self.fleet.table.apply_report(parsed, time.monotonic())
        except SlotTableError as error:
            log.error("cannot take the report of %s: %s", parsed.name, error)
            return 503, {"error": str(error)}
        if applied is Applied.NEW:
            log.info(
                "upstream %s (%s:%d) joined: %s, %d slots",
                parsed.name,
                parsed.host,
                parsed.port,
                parsed.state.name.lower(),
                parsed.slots_total,
            )
        return 200, _ACCEPTED[applied]

    def routes(self) -> list[Route]:
        fleet = self.fleet

        def refused(request: Request) -> Response | None:
            if self.authorized(request.headers.get("authorization", "").encode()):
                return None
            client = request.client.host if request.client else "?"
            self.log_refused(request.method, request.url.path, client)
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
            agents = [
                describe(row, now, fleet.settings.missed_reports) for row in fleet.table.rows()
            ]
            return JSONResponse({"agents": agents})

        # Read without the token, as exporters are: numbers, not secrets; keep the
        # management port on a private network (docs/operations.md).
        async def metrics(request: Request) -> Response:
            totals = counters.read_all(Path(counters_directory(fleet.settings)))
            return Response(
                exposition.render(totals, fleet.snapshot()),
                media_type=exposition.CONTENT_TYPE,
            )

        async def autoscaling(request: Request) -> Response:
            return JSONResponse(fleet.snapshot().demand.as_json())

        async def dashboard_page(request: Request) -> Response:
            return HTMLResponse(dashboard.PAGE, headers=_PAGE_HEADERS)

        async def dashboard_data(request: Request) -> Response:
            samples = counters.read_all(Path(counters_directory(fleet.settings)))
            data = dashboard.fleet_json(
                fleet.snapshot(),
                totals(samples, time.monotonic(), cumulative=False),
                fleet.settings.missed_reports,
            )
            return JSONResponse(data, headers={"Cache-Control": "no-store"})

        async def drain(request: Request) -> Response:
            """POST drains the upstreams named (by name, address or agent id): no new
            requests, those in flight finish; DELETE takes them back."""
            denied = refused(request)
            if denied is not None:
                return denied
            wanted = request.path_params["upstream"]
            draining = request.method == "POST"
            rows = fleet.table.drain(
                lambda row: wanted in (row.name, row.address, row.agent_id), draining
            )
            if not rows:
                return JSONResponse(
                    {"error": f"no upstream is named {wanted!r} (by name, address or agent id)"},
                    status_code=404,
                )
            for row in rows:
                log.info(
                    "upstream %s (%s) %s by an operator; %d request(s) in flight on it",
                    row.name,
                    row.address,
                    "drained" if draining else "back in rotation",
                    row.reservations,
                )
            now = time.monotonic()
            return JSONResponse(
                {"upstreams": [describe(row, now, fleet.settings.missed_reports) for row in rows]}
            )

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
            Route("/metrics", metrics, methods=["GET"]),
            Route("/api/v1/autoscaling", autoscaling, methods=["GET"]),
            Route("/dashboard", dashboard_page, methods=["GET"]),
            Route("/dashboard/fleet.json", dashboard_data, methods=["GET"]),
            Route("/api/v1/agents/{agent_id}", remove, methods=["DELETE"]),
            Route("/api/v1/upstreams/{upstream}/drain", drain, methods=["POST", "DELETE"]),
        ]


REPORTS_PATH = "/api/v1/agents/"
# The page's own inline script and style, nothing from elsewhere; no framing.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
_REFUSED = json.dumps({"error": "missing or wrong bearer token"}).encode()
_TOO_LARGE = json.dumps({"error": f"the report is larger than {MAX_REPORT_BYTES} bytes"}).encode()
# The answers to accepted reports, rendered once: a big fleet sends a thousand a second.
_ACCEPTED = {
    applied: json.dumps(
        {"accepted": applied is not Applied.IGNORED, "applied": applied.value}
    ).encode()
    for applied in Applied
}
