"""The management API: agents report here, operators and paddlerctl read the fleet."""

import hmac
import json
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from paddler.balancer.fleet import Fleet
from paddler.reports import ReportError, parse_report
from paddler.slots import Applied, SlotTableError
from paddler.slots.view import describe

log = logging.getLogger("paddler.balancer")

MAX_REPORT_BYTES = 65536


class Management:
    """The management API. Agents' reports, a thousand a second in a big fleet, are
    taken as plain ASGI (no framework objects per report: about a third of their CPU
    under Starlette); the rest is Starlette."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        token = fleet.settings.management_token
        self._expected = f"Bearer {token}".encode() if token else None

    def authorized(self, given: bytes) -> bool:
        return self._expected is None or hmac.compare_digest(given, self._expected)

    def log_refused(self, method: str, path: str, client: str) -> None:
        log.warning("refused %s %s from %s: missing or wrong bearer token", method, path, client)

    # -- reports, as plain ASGI ------------------------------------------------------------

    async def report(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if not self.authorized(headers.get(b"authorization", b"")):
            client = scope.get("client")
            self.log_refused("PUT", scope["path"], client[0] if client else "?")
            await _answer(
                send,
                {"error": "missing or wrong bearer token"},
                401,
                [(b"www-authenticate", b"Bearer")],
            )
            return
        body = await _read_body(receive, MAX_REPORT_BYTES)
        if body is None:
            await _answer(
                send, {"error": f"the report is larger than {MAX_REPORT_BYTES} bytes"}, 413
            )
            return
        status, answer = self._apply(scope["path"][len(REPORTS_PATH) :], body)
        await _answer(send, answer, status)

    def _apply(self, agent_id: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            payload = json.loads(body)
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
        return 200, {"accepted": applied is not Applied.IGNORED, "applied": applied.value}

    # -- everything else, with Starlette ---------------------------------------------------

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
            Route("/api/v1/agents/{agent_id}", remove, methods=["DELETE"]),
        ]


REPORTS_PATH = "/api/v1/agents/"


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None past ``limit`` bytes."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(
    send: Send,
    payload: dict[str, Any],
    status: int,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
