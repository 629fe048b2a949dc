"""llama.cpp's timings, which end a completion's answer: of the prompt's tokens, how many
it served from its cache (cache_n) and how many it processed (prompt_n), and how long that
took (prompt_ms), and how many it generated after (predicted_n). Read from the bytes the
proxy kept of the answer's end (http.py)."""

import re
from typing import Final

_CACHE_N: Final = re.compile(rb'"cache_n"\s*:\s*(\d+)')
# In llama.cpp's timings "cache_n" comes first, then "prompt_n" and "prompt_ms".
_PROMPT: Final = re.compile(rb'"prompt_n"\s*:\s*(\d+)\s*,\s*"prompt_ms"\s*:\s*([0-9.eE+-]+)')
_PREDICTED_N: Final = re.compile(rb'"predicted_n"\s*:\s*(\d+)')


class PromptTimings:
    """(A plain class: one is made for every completion.)"""

    __slots__ = ("cached", "generated", "processed", "seconds")

    def __init__(self, cached: int, processed: int, seconds: float, generated: int = -1) -> None:
        self.cached = cached
        # -1 and NaN: the answer said how many tokens came from cache, not the rest.
        self.processed = processed
        self.seconds = seconds
        self.generated = generated  # -1: not said

    @property
    def slot_tokens(self) -> int:
        """The tokens the slot holds after the answer (its prompt's and the answer's),
        which llama.cpp saves to its host cache with it; -1: not said."""
        if self.processed < 0 or self.generated < 0:
            return -1
        return self.cached + self.processed + self.generated


def prompt_timings(timings: bytes) -> PromptTimings | None:
    """What ``timings`` says of the prompt; None when it has no cache_n."""
    cached = _CACHE_N.search(timings)
    if cached is None:
        return None
    prompt = _PROMPT.search(timings, cached.end())
    if prompt is None:
        return PromptTimings(int(cached.group(1)), -1, float("nan"))
    try:
        seconds = float(prompt.group(2)) / 1000
    except ValueError:  # the pattern allows "1e" and "--"; llama.cpp never sends them
        seconds = float("nan")
    predicted = _PREDICTED_N.search(timings, prompt.end())
    generated = -1 if predicted is None else int(predicted.group(1))
    return PromptTimings(int(cached.group(1)), int(prompt.group(1)), seconds, generated)
