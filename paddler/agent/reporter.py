"""Sending reports to the balancers' management APIs."""

import logging
from typing import Any

import httpx

from paddler.config.addresses import format_address, parse_address

log = logging.getLogger("paddler.agent")


class Reporter:
    """Reports to every balancer; logs a balancer's trouble once, and its recovery once."""

    def __init__(
        self, balancers: list[str], agent_id: str, token: str | None, timeout: float
    ) -> None:
        self.agent_id = agent_id
        self._urls = []
        for address in balancers:
            parsed = parse_address(address)
            assert parsed is not None, address  # validated with the configuration
            self._urls.append(f"http://{format_address(*parsed)}/api/v1/agents/{agent_id}")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=timeout)
        self._trouble: dict[str, str] = {}

    def send(self, report: dict[str, Any]) -> None:
        for url in self._urls:
            self._note(url, self._put(url, report))

    def _put(self, url: str, report: dict[str, Any]) -> str:
        try:
            response = self._http.put(url, json=report)
        except httpx.HTTPError as error:
            return f"cannot reach it: {error or type(error).__name__}"
        if response.status_code == 200:
            return ""
        if response.status_code == 401:
            return "it refused our token (401): check management_token on both sides"
        return f"it answered {response.status_code}: {response.text[:300]}"

    def _note(self, url: str, trouble: str) -> None:
        before = self._trouble.get(url, "")
        if trouble and trouble != before:
            log.error("reporting to %s: %s", url, trouble)
        elif before and not trouble:
            log.info("reporting to %s works again", url)
        self._trouble[url] = trouble

    def deregister(self) -> None:
        for url in self._urls:
            try:
                self._http.delete(url)
            except httpx.HTTPError as error:
                log.warning("could not tell %s that this agent stops: %s", url, error)

    def close(self) -> None:
        self._http.close()
