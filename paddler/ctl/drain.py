"""paddlerctl drain: no new requests to an upstream while those in flight finish, for
maintenance and scale-in; --undo puts it back in rotation."""

import sys
import time
from typing import Any
from urllib.parse import quote

import httpx

from paddler.config import BalancerSettings
from paddler.config.addresses import format_address

WAIT_POLL = 0.2


def local_management_url(settings: BalancerSettings) -> str:
    """The management API of this host's balancer, as reachable from this host."""
    host = settings.management_host
    if host in ("0.0.0.0", ""):  # a wildcard listens on loopback too
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{format_address(host, settings.management_port)}"


def run(url: str, token: str | None, upstream: str, undo: bool, wait: float | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = url.rstrip("/")
    try:
        answer = httpx.request(
            "DELETE" if undo else "POST",
            f"{base}/api/v1/upstreams/{quote(upstream, safe='')}/drain",
            headers=headers,
            timeout=10,
        )
        if answer.status_code == 401:
            print("paddlerctl: the management API refused the token (401)", file=sys.stderr)
            return 1
        if answer.status_code == 404:
            print(f"paddlerctl: {answer.json()['error']}", file=sys.stderr)
            return 1
        answer.raise_for_status()
        upstreams: list[dict[str, Any]] = answer.json()["upstreams"]
        for described in upstreams:
            if undo:
                print(f"{described['name']} ({described['address']}): back in rotation")
            else:
                print(
                    f"{described['name']} ({described['address']}): draining, "
                    f"{described['reservations']} request(s) in flight"
                )
        if wait is None or undo:
            return 0
        return _wait(base, headers, {str(u["agent_id"]) for u in upstreams}, wait)
    except httpx.HTTPError as error:
        print(f"paddlerctl: {url}: {error}", file=sys.stderr)
        return 1


def _wait(base: str, headers: dict[str, str], agent_ids: set[str], timeout: float) -> int:
    """Until no request of this balancer is in flight on the drained upstreams."""
    deadline = time.monotonic() + timeout
    while True:
        agents = httpx.get(f"{base}/api/v1/agents", headers=headers, timeout=10).json()["agents"]
        busy = {
            str(agent["name"]): int(agent["reservations"])
            for agent in agents
            if agent["agent_id"] in agent_ids and int(agent["reservations"])
        }
        if not busy:
            print("drained: no request in flight on it; it can be stopped")
            return 0
        if time.monotonic() >= deadline:
            print(
                "paddlerctl: still in flight after "
                f"{timeout:g}s: {', '.join(f'{n} ({c})' for n, c in busy.items())}",
                file=sys.stderr,
            )
            return 1
        time.sleep(WAIT_POLL)
