"""llama.cpp's timings at the end of an answer, as the proxy reads them."""

import math

import pytest

from paddler.balancer.proxy.timings import prompt_timings

# The end of a stream and of a whole answer, as llama.cpp sends them (trimmed).
STREAM_END = (
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"timings":'
    b'{"cache_n":614,"prompt_n":155,"prompt_ms":212.5,"prompt_per_token_ms":1.37,'
    b'"predicted_n":32,"predicted_ms":640.0}}\n\ndata: [DONE]\n\n'
)
WHOLE = (
    b'{"content":"hi","tokens_cached":20,"timings":{"cache_n":0,"prompt_n":19,'
    b'"prompt_ms":3.2e1,"predicted_n":1}}'
)


def test_the_prompt_tokens_and_their_time_are_read_from_a_stream_and_an_answer() -> None:
    stream = prompt_timings(STREAM_END)
    assert stream is not None
    assert (stream.cached, stream.processed, stream.seconds) == (614, 155, 0.2125)
    whole = prompt_timings(WHOLE)
    assert whole is not None
    assert (whole.cached, whole.processed, whole.seconds) == (0, 19, 0.032)
    # With the answer's tokens, what the slot holds after it (saved with it to the host
    # cache).
    assert (stream.generated, stream.slot_tokens) == (32, 614 + 155 + 32)
    assert (whole.generated, whole.slot_tokens) == (1, 20)


@pytest.mark.parametrize(
    "text",
    [b'"cache_n":7}', b'"cache_n":7,"prompt_n":3,"prompt_ms":nan}', b'"prompt_n":3,"cache_n":7'],
)
def test_timings_without_a_readable_prompt_n_give_only_the_cached_tokens(text: bytes) -> None:
    found = prompt_timings(text)
    assert found is not None
    assert (found.cached, found.processed) == (7, -1)
    assert math.isnan(found.seconds)
    assert found.slot_tokens == -1


@pytest.mark.parametrize("text", [b"", b"data: [DONE]", b'{"error":{"code":500}}', b"\xff\xfe"])
def test_an_answer_without_timings_gives_none(text: bytes) -> None:
    assert prompt_timings(text) is None


def test_a_time_the_pattern_lets_through_but_is_no_number_is_not_a_number() -> None:
    found = prompt_timings(b'"cache_n":1,"prompt_n":40,"prompt_ms":1e-}')
    assert found is not None
    assert found.processed == 40
    assert math.isnan(found.seconds)
    assert (found.generated, found.slot_tokens) == (-1, -1)  # no predicted_n
