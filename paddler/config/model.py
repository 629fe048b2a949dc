"""The configuration's shape: one dataclass per section, one field per key.

These dataclasses are the schema. The loader validates against their fields, the
configuration reference in docs/ is checked against them by a test, and every role
reads its settings from them. A key's metadata carries its documentation and the
checks that its type alone does not express.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MANAGEMENT_PORT = 8085
DEFAULT_REVERSEPROXY_PORT = 8080
# Each worker needs an owner entry in the slot table, twice over while being replaced.
MAX_WORKERS = 120
DEFAULT_SLOT_ENDPOINTS = (
    "/completion",
    "/completions",
    "/v1/completions",
    "/chat/completions",
    "/v1/chat/completions",
    "/embedding",
    "/embeddings",
    "/v1/embeddings",
    "/infill",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/v1/reranking",
    "/v1/responses",
    "/v1/messages",
)
# The token that etc/paddler/paddler.toml ships with; a balancer still using it warns.
EXAMPLE_TOKEN = "replace-me-with-a-long-random-secret"  # noqa: S105 - a known-bad value


def setting(
    doc: str,
    default: Any = None,
    *,
    required: bool = False,
    check: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    factory: Any = None,
) -> Any:
    metadata = {
        "doc": doc,
        "check": check,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
    }
    if required:
        return field(metadata={**metadata, "required": True})
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PaddlerdSettings:
    """How paddlerd itself behaves."""

    pidfile: str = setting("Where paddlerd writes its process id.", "/run/paddler/paddlerd.pid")
    stop_timeout: float = setting(
        "Seconds a child has to stop after SIGTERM before it gets SIGKILL.", 30.0, minimum=0.1
    )
    backoff_initial: float = setting(
        "Seconds before the first restart of a child that died.", 1.0, minimum=0.05
    )
    backoff_max: float = setting(
        "Longest delay between two restarts, in seconds.", 60.0, minimum=0.05
    )
    fatal_after: int = setting(
        "Quick failures in a row after which paddlerd gives a child up (state fatal).",
        5,
        minimum=1,
    )
    min_uptime: float = setting(
        "Seconds a child must stay ready for its exit not to count as a quick failure.",
        10.0,
        minimum=0.0,
    )
    log_level: str = setting(
        "paddlerd's own log level.", "info", choices=("debug", "info", "warning", "error")
    )


@dataclass(frozen=True)
class BalancerSettings:
    """The balancer: the management API that agents report to, and the reverse proxy."""

    management_host: str = setting(
        "Address the management API listens on.", "127.0.0.1", check="host"
    )
    management_port: int = setting(
        "Port of the management API.", DEFAULT_MANAGEMENT_PORT, check="port"
    )
    management_token: str | None = setting(
        "Shared secret agents must send as a bearer token; unset: no token is required "
        "(only safe on loopback).",
        check="token",
    )
    reverseproxy_host: str = setting(
        "Address the reverse proxy listens on.", "127.0.0.1", check="host"
    )
    reverseproxy_port: int = setting(
        "Port of the reverse proxy that clients call.", DEFAULT_REVERSEPROXY_PORT, check="port"
    )
    workers: int | None = setting(
        "Balancer worker processes; unset: one per CPU core, at most 120.",
        minimum=1,
        maximum=MAX_WORKERS,
    )
    slot_table: str | None = setting(
        "The shared-memory slot table file (on a tmpfs); unset: "
        "/run/paddler/balancer-<management_port>.slots."
    )
    max_upstreams: int = setting(
        "Upstreams the slot table holds at once; one more agent's reports are refused "
        "(503) until a row frees. About 1 KB of shared memory each.",
        1024,
        minimum=1,
        maximum=65535,
    )
    request_buffer_size: int = setting(
        "Requests that may wait for a free slot at once; one more gets 503 with Retry-After.",
        30,
        minimum=1,
    )
    request_buffer_timeout: float = setting(
        "Seconds a request may wait for a free slot before it gets 504.", 30.0, minimum=0.1
    )
    max_body_size: int = setting(
        "Largest request body in bytes; a larger one gets 413.", 32 * 1024 * 1024, minimum=1024
    )
    header_timeout: float = setting(
        "Seconds a client may take to send a request's line and headers; slower ones are "
        "disconnected (slowloris).",
        10.0,
        minimum=0.1,
    )
    body_timeout: float = setting(
        "Seconds a client may take to send its request body; slower ones get 408.",
        60.0,
        minimum=0.1,
    )
    send_timeout: float = setting(
        "Seconds a client may accept nothing of its answer before it is disconnected "
        "(its slot would stay taken meanwhile).",
        60.0,
        minimum=0.1,
    )
    slot_endpoints: list[str] = setting(
        "Paths whose POST requests take a slot; others go to any upstream without one.",
        factory=lambda: list(DEFAULT_SLOT_ENDPOINTS),
        check="paths",
    )
    exposed_endpoints: list[str] = setting(
        "Upstream paths passed through although hidden by default (/slots, /metrics).",
        factory=list,
        check="paths",
    )
    upstream_connect_timeout: float = setting(
        "Seconds to connect to an upstream before trying another.", 5.0, minimum=0.05
    )
    upstream_read_timeout: float = setting(
        "Seconds an upstream may stay silent (before its first byte, or between two chunks).",
        600.0,
        minimum=0.1,
    )
    upstream_keepalive_timeout: float = setting(
        "Seconds an idle connection to an upstream is kept for reuse; keep it below the "
        "upstream's own idle timeout (llama-server closes idle connections after 5 s), or a "
        "request can meet a connection the upstream is closing.",
        4.0,
        minimum=0.0,
    )
    max_retries: int = setting(
        "Other upstreams tried after a connection failure or a 503 before the first byte.",
        2,
        minimum=0,
    )
    eject_after_failures: int = setting(
        "Failures in a row (connection errors, 5xx, timeouts) that eject an upstream.",
        3,
        minimum=1,
    )
    ejection_initial: float = setting(
        "Seconds of a first ejection; each ejection in a row doubles it.", 5.0, minimum=0.1
    )
    ejection_max: float = setting("Longest ejection, in seconds.", 300.0, minimum=0.1)
    api_keys: list[str] = setting(
        "Keys clients must send (Authorization: Bearer KEY, or X-Api-Key); empty: none.",
        factory=list,
        check="tokens",
    )
    upstream_api_key: str | None = setting(
        "Key sent to every llama-server (their --api-key) in place of the client's.",
        check="token",
    )
    debug_headers: bool = setting(
        "Add X-Paddler-Upstream (the upstream's name) and X-Paddler-Queue-Ms (time waited for "
        "a free slot) to responses; under cache_aware and session, X-Paddler-Cache (hit or "
        "miss: whether the prompt's prefix was expected cached there), and under cache_aware "
        "X-Paddler-Slot (the llama.cpp slot the request named) too.",
        False,
    )
    rewrite_host_header: bool = setting(
        "Send upstreams their own address as Host instead of the client's.", False
    )
    routing_policy: str = setting(
        "How a request that takes a slot picks among upstreams with a free one: cache_aware "
        "(the one most likely to hold the request's prompt prefix in its KV cache, else the "
        "least busy), least_busy (the most free slots: the original Paddler's), session (the "
        "one its session went to: session_header or the request's user field), round_robin.",
        "cache_aware",
        choices=("least_busy", "cache_aware", "session", "round_robin"),
    )
    session_header: str = setting(
        "The request header whose value keeps a session's requests on one upstream "
        "(cache_aware and session); the request's user field serves as well.",
        "x-session-id",
        check="name",
    )
    cache_max_imbalance: int = setting(
        "cache_aware and session routing keep a request on the upstream that holds its "
        "prefix while that one has a free slot and at most this many fewer free slots than "
        "the least busy upstream; past that, the least busy takes it.",
        2,
        minimum=0,
    )
    cache_max_wait: float = setting(
        "cache_aware: seconds at most that a request waits for an upstream whose copy of its "
        "prompt prefix is in use by another request, before it goes where it must process "
        "the prompt again. It waits no longer than that processing is expected to take "
        "(learned from llama.cpp's timings); 0: never waits.",
        2.0,
        minimum=0.0,
    )
    cache_pin_slots: bool = setting(
        "cache_aware: name the llama.cpp slot each completion request takes (its id_slot), "
        "by llama.cpp's own rule but with ties going to the slot used longest ago, so that a "
        "new conversation does not overwrite one still going. Only on upstreams whose slots "
        "are all this balancer's and whose llama.cpp build keeps its prompt cache for named "
        "slots (b10644 and later); false: llama.cpp chooses.",
        True,
    )
    missed_reports: int = setting(
        "Report intervals an agent may stay silent before its upstream gets no new requests.",
        3,
        minimum=1,
    )
    forget_after: float = setting(
        "Seconds of silence after which an upstream is removed from the table; never "
        "before it is stale (silent for missed_reports of its agent's report intervals).",
        60.0,
        minimum=1.0,
    )
    statsd_address: str | None = setting(
        "A StatsD server (host:port) that gets the fleet's gauges and the request counters "
        "over UDP every statsd_interval; unset: none.",
        check="address",
    )
    statsd_prefix: str = setting(
        "The first part of every StatsD metric name (paddler.requests_buffered, ...).",
        "paddler",
        check="name",
    )
    otlp_traces_endpoint: str | None = setting(
        "An OTLP/HTTP collector's traces URL (for example http://127.0.0.1:4318/v1/traces) "
        "that gets one span per proxied request; unset: no traces.",
        check="url",
    )
    otlp_service_name: str = setting(
        "The service.name of the spans' resource.", "paddler", check="name"
    )
    statsd_interval: float = setting("Seconds between two StatsD sends.", 10.0, minimum=0.1)


def slot_table_path(settings: BalancerSettings) -> str:
    return settings.slot_table or f"/run/paddler/balancer-{settings.management_port}.slots"


def prefix_index_path(settings: BalancerSettings) -> str:
    """The prefix index of cache-aware routing (paddler/prefixes/index.py)."""
    return slot_table_path(settings) + ".prefixes"


def names_slots(settings: BalancerSettings) -> bool:
    """Whether requests name the llama.cpp slot they take (and the slot record exists)."""
    return settings.routing_policy == "cache_aware" and settings.cache_pin_slots


def slot_contents_path(settings: BalancerSettings) -> str:
    """What each upstream's slots hold, for cache_aware (paddler/prefixes/slots.py)."""
    return slot_table_path(settings) + ".contents"


def management_lease_path(settings: BalancerSettings) -> str:
    """The lock that says which balancer worker serves the management API."""
    return slot_table_path(settings) + ".management"


def counters_directory(settings: BalancerSettings) -> str:
    """Where the balancer's processes keep their request counters (paddler/metrics)."""
    return slot_table_path(settings) + ".metrics"


@dataclass(frozen=True)
class AgentSettings:
    """An agent: watches one llama-server and reports its slots to the balancer."""

    local_llamacpp_port: int = setting(
        "Port of the llama-server this agent watches, as seen from this host.",
        required=True,
        check="port",
    )
    name: str | None = setting("Name shown for this upstream; defaults to its address.")
    local_llamacpp_host: str = setting(
        "Address of the llama-server this agent watches, as seen from this host.",
        "127.0.0.1",
        check="host",
    )
    local_llamacpp_api_key: str | None = setting(
        "API key of that llama-server (its --api-key), if it has one.", check="token"
    )
    external_llamacpp_host: str | None = setting(
        "Address the balancer uses to reach the llama-server; defaults to the local one. "
        '"aws:metadata:local-ipv4" asks the EC2 instance metadata service.',
        check="agent_host",
    )
    external_llamacpp_port: int | None = setting(
        "Port the balancer uses to reach the llama-server; defaults to the local one.",
        check="port",
    )
    balancers: list[str] = setting(
        "Management APIs to report to, as host:port.",
        factory=lambda: [f"127.0.0.1:{DEFAULT_MANAGEMENT_PORT}"],
        check="addresses",
    )
    management_token: str | None = setting(
        "The balancers' management token (their balancer.management_token).", check="token"
    )
    monitoring_interval: float = setting(
        "Seconds between two looks at the llama-server (and two reports).", 1.0, minimum=0.05
    )
    aws_metadata_url: str = setting(
        "Where the EC2 instance metadata service answers.", "http://169.254.169.254"
    )


@dataclass(frozen=True)
class LlamaCppSettings:
    """A llama-server that paddlerd launches and keeps running."""

    name: str = setting(
        "Unique name of this instance; prefixes its log lines.", required=True, check="name"
    )
    model: str = setting(
        "Path of the GGUF model file (relative paths start at the configuration file).",
        required=True,
        check="file",
    )
    port: int = setting("Port llama-server listens on.", required=True, check="port")
    alias: str | None = setting(
        "The model's name for clients (llama-server --alias; the model field of requests); "
        "unset: the model file's name without .gguf."
    )
    binary: str = setting(
        "The llama-server executable: a path, or a name looked up in PATH.",
        "llama-server",
        check="executable",
    )
    host: str = setting("Address llama-server listens on.", "127.0.0.1", check="host")
    slots: int = setting("Parallel sequences (llama-server --parallel).", 4, minimum=1)
    context_size: int | None = setting(
        "Total context in tokens, shared by the slots (--ctx-size); unset: the model's.",
        minimum=1,
    )
    extra_args: list[str] = setting("More llama-server arguments, passed as given.", factory=list)
    env: dict[str, str] = setting("Environment variables added for llama-server.", factory=dict)
    startup_timeout: float = setting(
        "Seconds llama-server may take to answer /health with 200 before it counts as failed.",
        600.0,
        minimum=1.0,
    )


@dataclass(frozen=True)
class Config:
    """A whole host configuration, validated."""

    source: Path
    paddlerd: PaddlerdSettings = field(default_factory=PaddlerdSettings)
    balancer: BalancerSettings | None = None
    agents: tuple[AgentSettings, ...] = ()
    llamacpps: tuple[LlamaCppSettings, ...] = ()


# Section name in the file -> (settings class, whether it is an array of tables).
SECTIONS: dict[str, tuple[type[Any], bool]] = {
    "paddlerd": (PaddlerdSettings, False),
    "balancer": (BalancerSettings, False),
    "agent": (AgentSettings, True),
    "llamacpp": (LlamaCppSettings, True),
}
