"""The agent's loop: look at the llama-server, report, sleep, until SIGTERM."""

import logging
import random
import signal
import time
import uuid

from paddler.agent.aws import MetadataError, local_ipv4
from paddler.agent.reporter import Reporter
from paddler.config import AgentSettings
from paddler.config.addresses import AWS_LOCAL_IPV4, format_address
from paddler.llamacpp.client import LlamaCppClient, UpstreamStatus
from paddler.llamacpp.host_cache import HostCacheError, host_cache_tokens
from paddler.reports import build_report
from paddler.slots.layout import UpstreamState

log = logging.getLogger("paddler.agent")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def external_address(settings: AgentSettings) -> tuple[str, int]:
    host = settings.external_llamacpp_host or settings.local_llamacpp_host
    if host == AWS_LOCAL_IPV4:
        host = local_ipv4(settings.aws_metadata_url)
        log.info("%s is %s", AWS_LOCAL_IPV4, host)
    return host, settings.external_llamacpp_port or settings.local_llamacpp_port


def _host_cache(host: str, port: int, model_path: str) -> int | None:
    """What llama-server's host cache keeps of idle slots' prompts (None: unknown, said
    in the log)."""
    try:
        tokens = host_cache_tokens(host, port, model_path)
    except Exception as error:  # an optional figure must not stop the agent
        if not isinstance(error, HostCacheError):
            error = HostCacheError(f"{type(error).__name__}: {error}")
        log.warning(
            "the size of llama-server's host-memory prompt cache is unknown (%s): the "
            "balancer will not count its saves of idle slots as copies of a prompt",
            error,
        )
        return None
    log.info("llama-server's host-memory prompt cache keeps %s tokens of idle slots", f"{tokens:,}")
    return tokens


def run(settings: AgentSettings) -> int:
    # Signals wait in the mask and end the sleep between two reports: nothing is
    # interrupted halfway, and a stop is still handled within milliseconds.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # httpx logs every request at INFO: once a second, forever. Changes are logged instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        host, port = external_address(settings)
    except MetadataError as error:
        log.error("%s", error)
        return 1
    name = settings.name or format_address(host, port)
    agent_id = uuid.uuid4().hex
    local = format_address(settings.local_llamacpp_host, settings.local_llamacpp_port)
    timeout = max(0.5, min(5.0, settings.monitoring_interval * 2))
    client = LlamaCppClient(f"http://{local}", settings.local_llamacpp_api_key, timeout)
    reporter = Reporter(settings.balancers, agent_id, settings.management_token, timeout)
    log.info(
        "agent %s (%s) watches llama-server at %s, reachable at %s, and reports to %s every %gs",
        agent_id,
        name,
        local,
        format_address(host, port),
        ", ".join(settings.balancers),
        settings.monitoring_interval,
    )
    sequence = 0
    last: UpstreamStatus | None = None
    host_cache: int | None = None
    rng = random.Random()
    try:
        while True:
            started = time.monotonic()
            status = client.status()
            if last is None or (status.state, status.error) != (last.state, last.error):
                log.info(
                    "llama-server at %s: %s%s (slots %d total, %d busy)",
                    local,
                    status.state.name.lower(),
                    f": {status.error}" if status.error else "",
                    status.slots_total,
                    status.slots_processing,
                )
            if status.state is UpstreamState.READY and (
                last is None or last.state is not UpstreamState.READY
            ):
                # Started or restarted, maybe with other settings.
                host_cache = _host_cache(
                    settings.local_llamacpp_host, settings.local_llamacpp_port, status.model_path
                )
            last = status
            sequence += 1
            reporter.send(
                build_report(
                    status,
                    sequence=sequence,
                    interval=settings.monitoring_interval,
                    name=name,
                    host=host,
                    port=port,
                    host_cache_tokens=host_cache,
                )
            )
            # Jitter keeps a fleet of agents started together from reporting in lockstep.
            pause = settings.monitoring_interval * rng.uniform(0.9, 1.1)
            remaining = max(0.0, pause - (time.monotonic() - started))
            received = signal.sigtimedwait(STOP_SIGNALS, remaining)
            if received is not None:
                log.info(
                    "%s: telling the balancers this agent stops",
                    signal.Signals(received.si_signo).name,
                )
                reporter.deregister()
                return 0
    finally:
        client.close()
        reporter.close()
