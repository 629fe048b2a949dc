"""What the proxy counts, written into this process's counter file."""

from __future__ import annotations

from bisect import bisect_left

from paddler.metrics.counters import CounterFile
from paddler.metrics.families import (
    CACHE_GUESSES,
    DURATION,
    EJECTIONS,
    FIRST_TOKEN,
    HOLDER_WAIT_SECONDS,
    HOLDER_WAITS,
    PROMPT_TOKENS,
    QUEUE_REJECTIONS,
    QUEUE_TIMEOUTS,
    QUEUE_WAIT,
    REQUESTS,
    RETRIES,
    SLOT_NAMING,
    Family,
)


def escape(value: str) -> str:
    """A label value as Prometheus's text format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**pairs: str) -> str:
    return ",".join(f'{name}="{escape(value)}"' for name, value in pairs.items())


class Histogram:
    """One histogram of one set of labels, its values' places in the counter file.
    Buckets are stored one by one (an observation adds to one bucket, its sum and its
    count); the exposition adds them up."""

    def __init__(self, family: Family, label_text: str, counters: CounterFile) -> None:
        inner = label_text + "," if label_text else ""
        self.bounds = family.buckets
        names = [f'{family.name}_bucket{{{inner}le="{bound:g}"}}' for bound in family.buckets]
        names.append(f'{family.name}_bucket{{{inner}le="+Inf"}}')
        self.buckets = [counters.index(name) for name in names]
        suffix = f"{{{label_text}}}" if label_text else ""
        self.sum = counters.index(f"{family.name}_sum{suffix}")
        self.count = counters.index(f"{family.name}_count{suffix}")

    def observe(self, counters: CounterFile, value: float) -> None:
        doubles = counters.doubles
        doubles[self.buckets[bisect_left(self.bounds, value)]] += 1
        doubles[self.sum] += value
        doubles[self.count] += 1


class Recorder:
    """The proxy's counts. Each label set's places in the counter file are found once
    and remembered: a request costs one dictionary lookup and a few additions there."""

    def __init__(self, counters: CounterFile) -> None:
        self.counters = counters
        self._requests: dict[tuple[str, int, str], tuple[int, Histogram]] = {}
        self._histograms: dict[tuple[str, str], Histogram] = {}
        self._per_upstream: dict[tuple[str, str], str] = {}
        self._prompt_tokens: dict[str, tuple[int, int]] = {}
        self._queue_wait = Histogram(QUEUE_WAIT, "", counters)

    def request(
        self, route: str, status: int, upstream: str, seconds: float, first_token: float | None
    ) -> None:
        known = self._requests.get((route, status, upstream))
        if known is None:
            text = labels(route=route, status=str(status), upstream=upstream)
            known = (
                self.counters.index(f"{REQUESTS.name}{{{text}}}"),
                self._histogram(DURATION, route),
            )
            self._requests[(route, status, upstream)] = known
        count, duration = known
        self.counters.doubles[count] += 1
        duration.observe(self.counters, seconds)
        if first_token is not None:
            self._histogram(FIRST_TOKEN, route).observe(self.counters, first_token)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(self.counters, seconds)

    def queue_timed_out(self) -> None:
        self.counters.add(QUEUE_TIMEOUTS.name)

    def queue_rejected(self) -> None:
        self.counters.add(QUEUE_REJECTIONS.name)

    def retried(self, upstream: str) -> None:
        self.counters.add(self._upstream_key(RETRIES, upstream))

    def ejected(self, upstream: str) -> None:
        self.counters.add(self._upstream_key(EJECTIONS, upstream))

    def cache_guess(self, outcome: str) -> None:
        self.counters.add(self._upstream_key(CACHE_GUESSES, outcome, "outcome"))

    def prompt_tokens(self, upstream: str, cached: int, processed: int) -> None:
        """llama.cpp's timings of an answer from ``upstream`` (``processed`` < 0: it did
        not say)."""
        known = self._prompt_tokens.get(upstream)
        if known is None:
            name = PROMPT_TOKENS.name
            known = (
                self.counters.index(f"{name}{{{labels(source='cache', upstream=upstream)}}}"),
                self.counters.index(f"{name}{{{labels(source='processed', upstream=upstream)}}}"),
            )
            self._prompt_tokens[upstream] = known
        doubles = self.counters.doubles  # (after index(): a new key may replace it)
        doubles[known[0]] += cached
        if processed > 0:
            doubles[known[1]] += processed

    def holder_wait(self, outcome: str, seconds: float) -> None:
        self.counters.add(self._upstream_key(HOLDER_WAITS, outcome, "outcome"))
        self.counters.add(self._upstream_key(HOLDER_WAIT_SECONDS, outcome, "outcome"), seconds)

    def slot_naming(self, outcome: str) -> None:
        self.counters.add(self._upstream_key(SLOT_NAMING, outcome, "outcome"))

    def _histogram(self, family: Family, route: str) -> Histogram:
        histogram = self._histograms.get((family.name, route))
        if histogram is None:
            histogram = Histogram(family, labels(route=route), self.counters)
            self._histograms[(family.name, route)] = histogram
        return histogram

    def _upstream_key(self, family: Family, value: str, label: str = "upstream") -> str:
        key = self._per_upstream.get((family.name, value))
        if key is None:
            key = f'{family.name}{{{label}="{escape(value)}"}}'
            self._per_upstream[(family.name, value)] = key
        return key
