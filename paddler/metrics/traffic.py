"""Request rates and latency from the balancer's counters (paddlerctl status, the dashboard).

On the balancer host the counters come from the counter files (paddler/metrics), from
elsewhere from /metrics; either way two readings some seconds apart give the rates and,
from the duration histogram's buckets, the latency quantiles over that window, and from
llama.cpp's timings (paddler_prompt_tokens_total) the share of prompt tokens served from
cache, for the fleet and per upstream.
"""

import math
import re
from dataclasses import dataclass, field

from paddler.metrics.families import DURATION, PROMPT_TOKENS, REQUESTS

_BUCKET = re.compile(r'le="([^"]+)"')
_UPSTREAM = re.compile(r'upstream="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Totals:
    at: float
    requests: float
    errors: float  # status 5xx
    buckets: dict[float, float]  # upper bound -> requests at most that long (cumulative)
    # Per upstream: prompt tokens served from cache, and processed (llama.cpp's timings).
    cached: dict[str, float] = field(default_factory=dict)
    processed: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Traffic:
    window: float
    requests_per_second: float
    errors_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    # Of the prompt tokens answered in the window, the share served from cache (None:
    # none answered), for the fleet and per upstream.
    cache_share: float | None = None
    upstream_cache_share: dict[str, float] = field(default_factory=dict)


def totals(samples: dict[str, float], at: float, cumulative: bool) -> Totals:
    """From sample keys as Prometheus prints them: the counter files keep each bucket's
    own count (cumulative=False), /metrics prints them added up (cumulative=True)."""
    requests = errors = 0.0
    per_bound: dict[float, float] = {}
    cached: dict[str, float] = {}
    processed: dict[str, float] = {}
    prefix = DURATION.name + "_bucket{"
    for key, value in samples.items():
        if key.startswith(REQUESTS.name + "{"):
            requests += value
            if 'status="5' in key:
                errors += value
        elif key.startswith(PROMPT_TOKENS.name + "{"):
            upstream = _UPSTREAM.search(key)
            name = _unescape(upstream.group(1)) if upstream else ""
            into = cached if 'source="cache"' in key else processed
            into[name] = into.get(name, 0.0) + value
        elif key.startswith(prefix):
            match = _BUCKET.search(key)
            if match:
                bound = float(match.group(1))
                per_bound[bound] = per_bound.get(bound, 0.0) + value
    buckets: dict[float, float] = {}
    running = 0.0
    for bound in sorted(per_bound):
        running = per_bound[bound] if cumulative else running + per_bound[bound]
        buckets[bound] = running
    return Totals(at, requests, errors, buckets, cached, processed)


def _unescape(value: str) -> str:
    """A label value as Prometheus's text format writes it, as it was."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_exposition(text: str) -> dict[str, float]:
    """Sample key -> value from Prometheus's text format (what /metrics answers)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            samples[key] = float(value)
        except ValueError:
            continue
    return samples


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket the rank falls in."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def traffic(old: Totals, new: Totals) -> Traffic:
    if new.requests < old.requests:  # the balancer restarted: its counts began again
        old = Totals(old.at, 0.0, 0.0, {})
    window = max(1e-9, new.at - old.at)
    delta = {bound: new.buckets[bound] - old.buckets.get(bound, 0.0) for bound in new.buckets}
    p50 = quantile(0.5, delta)
    p99 = quantile(0.99, delta)
    shares: dict[str, float] = {}
    fleet_cached = fleet_prompt = 0.0
    for name in sorted({*new.cached, *new.processed}):
        cached = max(0.0, new.cached.get(name, 0.0) - old.cached.get(name, 0.0))
        prompt = cached + max(0.0, new.processed.get(name, 0.0) - old.processed.get(name, 0.0))
        if prompt > 0:
            shares[name] = cached / prompt
            fleet_cached += cached
            fleet_prompt += prompt
    return Traffic(
        window=round(window, 1),
        requests_per_second=max(0.0, new.requests - old.requests) / window,
        errors_per_second=max(0.0, new.errors - old.errors) / window,
        p50_ms=None if p50 is None else p50 * 1000,
        p99_ms=None if p99 is None else p99 * 1000,
        cache_share=fleet_cached / fleet_prompt if fleet_prompt else None,
        upstream_cache_share=shares,
    )
