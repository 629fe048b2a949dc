"""What the agent asks a llama-server, and what the answers mean for the balancer."""

from dataclasses import dataclass, replace

import httpx

from paddler.llamacpp.formats import (
    UnsupportedFormatError,
    parse_metrics,
    parse_props,
    parse_slots,
)
from paddler.slots.layout import UpstreamState


@dataclass(frozen=True)
class UpstreamStatus:
    state: UpstreamState
    slots_total: int = 0
    slots_idle: int = 0
    slots_processing: int = 0
    model: str = ""
    build: str = ""
    error: str = ""
    model_path: str = ""  # the model file, as /props names it


class LlamaCppClient:
    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        # Whether this llama-server has --metrics; None until the first look.
        self._metrics_enabled: bool | None = None

    def close(self) -> None:
        self._http.close()

    def status(self) -> UpstreamStatus:
        try:
            return self._status()
        except httpx.TransportError as error:
            return UpstreamStatus(
                UpstreamState.UNREACHABLE, error=f"cannot reach {self.base_url}: {_describe(error)}"
            )
        except UnsupportedFormatError as error:
            return UpstreamStatus(UpstreamState.ERROR, error=f"unsupported llama.cpp: {error}")
        except ValueError as error:  # not JSON at all
            return UpstreamStatus(UpstreamState.ERROR, error=f"not llama-server JSON: {error}")

    def _status(self) -> UpstreamStatus:
        health = self._http.get("/health")
        if health.status_code == 503:
            return UpstreamStatus(UpstreamState.LOADING, error="loading its model")
        if health.status_code != 200:
            return UpstreamStatus(
                UpstreamState.ERROR, error=f"/health answered {health.status_code}"
            )
        response = self._http.get("/props")
        if response.status_code == 401:
            return UpstreamStatus(
                UpstreamState.UNAUTHORIZED,
                error="llama-server wants an API key (401); set local_llamacpp_api_key",
            )
        if response.status_code != 200:
            return UpstreamStatus(
                UpstreamState.ERROR, error=f"/props answered {response.status_code}"
            )
        props = parse_props(response.json())
        known = UpstreamStatus(
            UpstreamState.READY,
            slots_total=props.total_slots,
            model=props.model,
            build=props.build,
            model_path=props.model_path,
        )
        if props.is_sleeping:
            # Asking /slots would wake it: report what /props says and leave it asleep.
            return replace(
                known,
                state=UpstreamState.ASLEEP,
                slots_idle=props.total_slots,
                error="asleep (--sleep-idle-seconds)",
            )
        if self._metrics_enabled is not False:
            response = self._http.get("/metrics")
            self._metrics_enabled = response.status_code == 200
            if self._metrics_enabled:
                # /metrics never resets llama-server's idle timer (/slots does, which would
                # keep a server started with --sleep-idle-seconds awake forever).
                busy = min(props.total_slots, parse_metrics(response.text).requests_processing)
                return replace(known, slots_idle=props.total_slots - busy, slots_processing=busy)
        response = self._http.get("/slots")
        if response.status_code == 501:
            return replace(
                known,
                state=UpstreamState.SLOTS_DISABLED,
                error="/slots is disabled (--no-slots): busy slots unknown",
            )
        if response.status_code == 401:
            return replace(known, state=UpstreamState.UNAUTHORIZED, error="/slots answered 401")
        if response.status_code != 200:
            return replace(
                known, state=UpstreamState.ERROR, error=f"/slots answered {response.status_code}"
            )
        counts = parse_slots(response.json())
        return replace(known, slots_idle=counts.idle, slots_processing=counts.processing)


def _describe(error: httpx.TransportError) -> str:
    return str(error) or type(error).__name__
