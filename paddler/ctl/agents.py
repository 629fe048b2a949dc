"""paddlerctl agents: the fleet as the balancer sees it.

On the balancer host it reads the slot table directly, read-only and without its
lock, so it can never slow or block the balancer; from elsewhere it asks the
management API.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from paddler.config import BalancerSettings
from paddler.slots import SlotTable, SlotTableError
from paddler.slots.view import describe

COLUMNS = ("name", "address", "state", "busy/total", "reserved", "age", "model", "error")


def from_table(path: Path, settings: BalancerSettings) -> list[dict[str, Any]]:
    table = SlotTable.open(path, readonly=True)
    try:
        rows = table.rows()
    finally:
        table.close()
    now = time.monotonic()
    return [describe(row, now, settings.missed_reports) for row in rows]


def from_management(url: str, token: str | None) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url.rstrip('/')}/api/v1/agents", headers=headers, timeout=10)
    if response.status_code == 401:
        raise PermissionError("the management API refused the token (401); pass --token")
    response.raise_for_status()
    agents: list[dict[str, Any]] = response.json()["agents"]
    return agents


def render(agents: list[dict[str, Any]]) -> str:
    lines = [
        [
            str(agent["name"]),
            str(agent["address"]),
            str(agent["state"]),
            f"{agent['slots']['processing']}/{agent['slots']['total']}",
            str(agent["reservations"]),
            f"{agent['last_report_age']:.1f}s",
            str(agent["model"]),
            str(agent["error"]),
        ]
        for agent in agents
    ]
    widths = [max(len(row[i]) for row in [list(COLUMNS), *lines]) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(COLUMNS), *lines]
    )


def show(agents: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        json.dump({"agents": agents}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif agents:
        print(render(agents))
    else:
        print("no agents have reported")


def run(
    settings: BalancerSettings | None,
    table: Path | None,
    management: str | None,
    token: str | None,
    as_json: bool,
) -> int:
    try:
        if management is not None:
            show(from_management(management, token), as_json)
        else:
            assert table is not None
            show(from_table(table, settings or BalancerSettings()), as_json)
    except (SlotTableError, PermissionError, httpx.HTTPError) as error:
        print(f"paddlerctl: {error}", file=sys.stderr)
        return 1
    return 0
