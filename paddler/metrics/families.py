"""Every metric the balancer exports: name, type and help, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    buckets: tuple[float, ...] = ()


REQUESTS = Family(
    "paddler_requests_total",
    "counter",
    "Requests answered, by route, status and upstream (none: answered by the balancer; "
    "status 499: the client left first).",
)
DURATION = Family(
    "paddler_request_duration_seconds",
    "histogram",
    "Time from a request's arrival to the end of its answer, by route.",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
FIRST_TOKEN = Family(
    "paddler_time_to_first_token_seconds",
    "histogram",
    "Time from a streamed request's arrival to its first event from the upstream, by route.",
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
QUEUE_WAIT = Family(
    "paddler_queue_wait_seconds",
    "histogram",
    "Time requests that take a slot waited for one (0 when one was free).",
    (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_TIMEOUTS = Family(
    "paddler_queue_timeouts_total",
    "counter",
    "Requests that waited request_buffer_timeout for a slot and got 504.",
)
QUEUE_REJECTIONS = Family(
    "paddler_queue_rejections_total",
    "counter",
    "Requests refused with 503 because the request buffer was full.",
)
RETRIES = Family(
    "paddler_retries_total",
    "counter",
    "Attempts that failed on an upstream before the first byte of its answer, by that "
    "upstream; the request went on to another one while max_retries allowed.",
)
EJECTIONS = Family(
    "paddler_ejections_total", "counter", "Times an upstream was ejected, by upstream."
)
QUEUE_DEPTH = Family("paddler_queue_depth", "gauge", "Requests waiting for a free slot now.")
QUEUE_OLDEST = Family(
    "paddler_queue_oldest_wait_seconds",
    "gauge",
    "How long the oldest waiting request has waited (0: none waits).",
)
COPY_TRUST = Family(
    "paddler_cache_copy_trust",
    "gauge",
    "cache_aware: how often requests sent to a copy of a prefix that llama.cpp saved to "
    "its host cache as a prompt branched off found it there (moving average, 1 at "
    "start); such copies count while it is 0.5 or more.",
)
HOST_TRUST = Family(
    "paddler_cache_host_trust",
    "gauge",
    "cache_aware: how often requests that relied on llama.cpp's host cache found there "
    "the prefix expected (moving average, 1 at start); copies saved from idle slots "
    "count while it is 0.8 or more.",
)
PREFILL_RATE = Family(
    "paddler_cache_prefill_seconds_per_character",
    "gauge",
    "cache_aware: seconds of prefill per prompt character, learned from llama.cpp's "
    "timings (0: not yet); it bounds the wait for a busy holder (cache_max_wait).",
)
SLOTS_TOTAL = Family(
    "paddler_upstream_slots_total", "gauge", "Slots of each upstream, as its agent reported."
)
SLOTS_IDLE = Family(
    "paddler_upstream_slots_idle",
    "gauge",
    "Slots of each upstream free for a new request now.",
)
SLOTS_BUSY = Family(
    "paddler_upstream_slots_busy",
    "gauge",
    "Slots of each upstream processing (reported by its agent, or reserved here since).",
)
RESERVATIONS = Family(
    "paddler_upstream_reservations",
    "gauge",
    "Requests this balancer has in flight on each upstream.",
)
REPORT_AGE = Family(
    "paddler_upstream_report_age_seconds",
    "gauge",
    "Seconds since each upstream's agent last reported.",
)
UPSTREAM_STATE = Family(
    "paddler_upstream_state",
    "gauge",
    "1 for each upstream's current state (ready, stale, ejected, loading, ...).",
)
UPSTREAMS = Family("paddler_upstreams", "gauge", "Upstreams known, by state.")
DESIRED = Family(
    "paddler_upstreams_desired",
    "gauge",
    "Upstreams that demand calls for: ceil((busy slots + queued requests) / slots per "
    "upstream); at least 1 while requests wait.",
)

UTILIZATION = Family(
    "paddler_slots_utilization",
    "gauge",
    "(busy slots + queued requests) / slots of the upstreams in rotation; above 1: "
    "requests wait. 1 while requests wait with no upstream at all.",
)

CACHE_GUESSES = Family(
    "paddler_cache_guesses_total",
    "counter",
    "cache_aware routing's guesses, judged by llama.cpp's timings: hit (the upstream "
    "expected to hold the prompt's prefix served some of it from cache), miss (it did "
    "not), none (no upstream was expected to hold it).",
)

PROMPT_TOKENS = Family(
    "paddler_prompt_tokens_total",
    "counter",
    "Prompt tokens of the answers that took a slot, as llama.cpp's timings count them, by "
    "upstream and source: cache (served from its KV or host-memory cache, cache_n) or "
    "processed (prefilled, prompt_n). cache / (cache + processed) is the share of prompt "
    "tokens served from cache.",
)
HOLDER_WAITS = Family(
    "paddler_cache_holder_waits_total",
    "counter",
    "cache_aware: requests that waited for a busy upstream holding their prompt's prefix "
    "(cache_max_wait), by outcome: freed (a holder was free again within the wait) or "
    "expired (none was; the request went where the policy sends it without one).",
)
HOLDER_WAIT_SECONDS = Family(
    "paddler_cache_holder_wait_seconds_total",
    "counter",
    "cache_aware: the seconds those requests waited for a busy holder, by outcome.",
)
SLOT_NAMING = Family(
    "paddler_cache_slot_naming_total",
    "counter",
    "cache_aware with cache_pin_slots: completions that could name their llama.cpp slot, "
    "by outcome: named (id_slot sent), unnamed (llama.cpp takes the slot the record chose "
    "by itself: a never-used one, which it may fill from its host-memory cache), off (the "
    "upstream's slots cannot be named: busy slots this balancer did not fill, more than "
    "32 slots, or a llama.cpp build before b10644).",
)

COUNTERS = (
    REQUESTS,
    QUEUE_TIMEOUTS,
    QUEUE_REJECTIONS,
    RETRIES,
    EJECTIONS,
    CACHE_GUESSES,
    PROMPT_TOKENS,
    HOLDER_WAITS,
    HOLDER_WAIT_SECONDS,
    SLOT_NAMING,
)
HISTOGRAMS = (DURATION, FIRST_TOKEN, QUEUE_WAIT)
GAUGES = (
    QUEUE_DEPTH,
    QUEUE_OLDEST,
    UPSTREAMS,
    DESIRED,
    UTILIZATION,
    SLOTS_TOTAL,
    SLOTS_IDLE,
    SLOTS_BUSY,
    RESERVATIONS,
    REPORT_AGE,
    UPSTREAM_STATE,
    COPY_TRUST,
    HOST_TRUST,
    PREFILL_RATE,
)
ALL = (*COUNTERS, *HISTOGRAMS, *GAUGES)
