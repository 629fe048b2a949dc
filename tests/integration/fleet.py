"""A whole single-host fleet under paddlerd: llama-servers, their agents, the balancer."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from paddler.testbed.ports import free_port
from tests.integration.harness import PaddlerdRunner, llamacpp_entry


@dataclass
class Fleet:
    paddlerd: PaddlerdRunner
    proxy: int
    management: int
    servers: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.proxy}{path}"

    def health(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(self.url("/health"), timeout=5).json()
        return answer

    def wait_idle(self, slots: int, timeout: float) -> bool:
        """Whether the balancer sees ``slots`` idle slots within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health()["slots"]["idle"] == slots:
                return True
            time.sleep(0.02)
        return False

    def agents(self) -> dict[str, dict[str, object]]:
        answer = httpx.get(f"http://127.0.0.1:{self.management}/api/v1/agents", timeout=5)
        return {agent["name"]: agent for agent in answer.json()["agents"]}

    def wait_for_report(self, name: str, timeout: float = 15.0) -> None:
        """Until the agent of ``name`` has just reported: its next report is then a whole
        interval away, for a test that acts behind the balancer's back meanwhile."""
        deadline = time.monotonic() + timeout
        while float(str(self.agents()[name]["last_report_age"])) > 0.5:
            assert time.monotonic() < deadline, f"no report from {name}'s agent"
            time.sleep(0.02)

    def deferred(self, name: str) -> int:
        """llama.cpp's requests_deferred: requests waiting inside llama-server itself."""
        text = httpx.get(f"http://127.0.0.1:{self.servers[name]}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("llamacpp:requests_deferred "):
                return int(float(line.split()[1]))
        raise AssertionError("no requests_deferred in /metrics")

    def busy_slots(self, name: str) -> int:
        slots = httpx.get(f"http://127.0.0.1:{self.servers[name]}/slots", timeout=5).json()
        return sum(1 for slot in slots if slot["is_processing"])


def start_fleet(
    paddlerd: PaddlerdRunner,
    binary: Path,
    models: dict[str, Path],
    *,
    slots: int = 2,
    balancer: str = "",
    interval: float = 0.3,
    paddlerd_extra: str = "",
    context_per_slot: int = 4096,
    agents: bool = True,
    aliases: dict[str, str] | None = None,
    llama_api_key: str | None = None,
    llama_extra: tuple[str, ...] = (),
) -> Fleet:
    """Start a fleet with one llama-server (and agent) per entry of ``models``."""
    fleet = Fleet(paddlerd, proxy=free_port(), management=free_port())
    text = (
        f"backoff_initial = 2.0\n{paddlerd_extra}"
        f"[balancer]\nmanagement_port = {fleet.management}\nreverseproxy_port = {fleet.proxy}\n"
        f'workers = 2\ndebug_headers = true\nslot_table = "{paddlerd.directory}/slots"\n'
        f"{balancer}"
    )
    for name, model in models.items():
        port = free_port()
        fleet.servers[name] = port
        if agents:
            text += (
                f'[[agent]]\nname = "{name}"\nlocal_llamacpp_port = {port}\n'
                f'balancers = ["127.0.0.1:{fleet.management}"]\n'
                f"monitoring_interval = {interval}\n"
            )
            if llama_api_key:
                text += f'local_llamacpp_api_key = "{llama_api_key}"\n'
        extra = (*llama_extra, *(("--api-key", llama_api_key) if llama_api_key else ()))
        entry = llamacpp_entry(name, binary, model, port, slots=slots, extra_args=extra)
        text += entry.replace(
            f"context_size = {256 * slots}",
            f"context_size = {context_per_slot * slots}\n"
            f'alias = "{(aliases or {}).get(name, "tiny")}"',
        )
    paddlerd.write_config(text)
    paddlerd.start()
    paddlerd.wait_for_log(r"\[paddlerd\] INFO ready: ")
    if agents:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if len([a for a in fleet.agents().values() if a["in_rotation"]]) == len(models):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the fleet did not come up: {fleet.agents()}")
    return fleet


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(fleet: Fleet) -> Samples:
    """/metrics parsed by Prometheus's own client library: sample name -> labels -> value."""
    answer = httpx.get(f"http://127.0.0.1:{fleet.management}/metrics", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def settled(
    fleet: Fleet, name: str, wanted: dict[tuple[tuple[str, str], ...], float], within: float = 5
) -> Samples:
    """The metrics once ``name`` says ``wanted``, or as they are after ``within`` seconds.
    (A worker counts what an answer's end says just after sending that end: a scrape
    right after the client read it may come a moment before.)"""
    deadline = time.monotonic() + within
    samples = scrape(fleet)
    while samples.get(name) != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(fleet)
    return samples
