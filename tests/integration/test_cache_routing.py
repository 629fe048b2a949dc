"""Cache-aware routing on real llama-servers (2 servers x 2 slots): a conversation stays
where its prompt is cached, moves when that server is full, and a restart forgets."""

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.fleet import Fleet, scrape, settled, start_fleet
from tests.integration.harness import PaddlerdRunner

pytestmark = pytest.mark.llamacpp

SYSTEM = "You answer in one short sentence about boats and rivers. " * 6
# A long stream that keeps a slot busy for seconds: top logprobs make each event big.
FILLER = {
    "messages": [{"role": "user", "content": "filler"}],
    "max_tokens": 3500,
    "ignore_eos": True,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 10,
}


def cache_fleet(
    paddlerd: PaddlerdRunner,
    binary: Path,
    model: Path,
    imbalance: int = 2,
    interval: float = 0.3,
) -> Fleet:
    fleet = start_fleet(
        paddlerd,
        binary,
        {"a": model, "b": model},
        balancer=f'routing_policy = "cache_aware"\ncache_max_imbalance = {imbalance}\n',
        interval=interval,
    )
    assert fleet.wait_idle(4, timeout=30)
    return fleet


def turn(fleet: Fleet, messages: list[dict[str, str]]) -> tuple[str, str, dict[str, int]]:
    """One turn: (upstream, expected cache, llama.cpp's timings); the reply is appended."""
    answer = httpx.post(
        fleet.url("/v1/chat/completions"),
        json={"messages": messages, "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return (
        answer.headers["x-paddler-upstream"],
        answer.headers["x-paddler-cache"],
        body["timings"],
    )


def conversation(opening: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]


@contextmanager
def occupied(fleet: Fleet, upstream: str, slots: int) -> Iterator[None]:
    """Streams through the balancer holding ``slots`` of one upstream's slots for the
    block: the others drained while they start, and left unread, so that the balancer
    keeps their reservations (the tiny model generates faster than a test can watch;
    top logprobs make each event big enough to fill every buffer on the way)."""
    management = f"http://127.0.0.1:{fleet.management}/api/v1/upstreams"
    others = [name for name in fleet.servers if name != upstream]
    readers: list[Iterator[str]] = []  # kept: a dropped reader closes its stream
    with ExitStack() as stack:
        for name in others:
            httpx.post(f"{management}/{name}/drain", timeout=5).raise_for_status()
        try:
            for _ in range(slots):
                client = stack.enter_context(httpx.Client(timeout=120))
                stream = stack.enter_context(
                    client.stream("POST", fleet.url("/v1/chat/completions"), json=FILLER)
                )
                assert stream.headers["x-paddler-upstream"] == upstream
                readers.append(stream.iter_lines())
                next(readers[-1])
        finally:
            for name in others:
                httpx.delete(f"{management}/{name}/drain", timeout=5).raise_for_status()
        time.sleep(0.5)  # longer than the tiny model takes to finish: only ours hold on
        assert fleet.agents()[upstream]["reservations"] == slots
        yield


def test_a_conversation_stays_where_its_prompt_is_cached(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = cache_fleet(paddlerd, llama_server_binary, tiny_model)
    messages = conversation("Tell me about the Danube.")
    first, expected, timings = turn(fleet, messages)
    assert expected == "miss"  # nothing known yet
    cached, processed = timings["cache_n"], timings["prompt_n"]
    for number in range(4):
        messages.append({"role": "user", "content": f"And then, part {number}?"})
        upstream, expected, timings = turn(fleet, messages)
        assert (upstream, expected) == (first, "hit")
        assert timings["cache_n"] > 0  # llama.cpp agrees: the prefix came from its cache
        cached, processed = cached + timings["cache_n"], processed + timings["prompt_n"]
    # A second conversation with the same system prompt, while both are idle, goes where
    # that prompt is cached too.
    other = conversation("Tell me about the Rhine.")
    upstream, expected, timings = turn(fleet, other)
    assert (upstream, expected) == (first, "hit")
    cached, processed = cached + timings["cache_n"], processed + timings["prompt_n"]
    # The prompt tokens counted are llama.cpp's own, all on the one upstream.
    counted: dict[tuple[tuple[str, str], ...], float] = {
        (("source", "cache"), ("upstream", first)): cached,
        (("source", "processed"), ("upstream", first)): processed,
    }
    samples = settled(fleet, "paddler_prompt_tokens_total", counted)
    assert samples["paddler_prompt_tokens_total"] == counted
    assert samples["paddler_cache_guesses_total"][(("outcome", "hit"),)] == 5
    # Every request could name its slot on this build (named, or left to llama.cpp
    # where it takes the same one).
    naming = samples["paddler_cache_slot_naming_total"]
    assert sum(naming.values()) == 6
    assert (("outcome", "off"),) not in naming


def test_a_conversation_moves_when_its_upstream_is_full(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = cache_fleet(paddlerd, llama_server_binary, tiny_model, imbalance=0)
    messages = conversation("Tell me about the Loire.")
    home, _, _ = turn(fleet, messages)
    away = "b" if home == "a" else "a"
    messages.append({"role": "user", "content": "More?"})
    with occupied(fleet, home, 1):
        # One of its two slots busy, the other server idle: with cache_max_imbalance 0
        # even one free slot fewer is too many.
        upstream, expected, _ = turn(fleet, messages)
        assert upstream == away
        assert expected == "miss"
    messages.append({"role": "user", "content": "And more?"})
    # It took its prefix along: now it is cached on the other one, and stays there.
    upstream, expected, _ = turn(fleet, messages)
    assert (upstream, expected) == (away, "hit")


def test_a_restarted_upstream_forgets_its_prefixes(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    fleet = cache_fleet(paddlerd, llama_server_binary, tiny_model)
    messages = conversation("Tell me about the Seine.")
    home, _, _ = turn(fleet, messages)
    messages.append({"role": "user", "content": "More?"})
    assert turn(fleet, messages)[:2] == (home, "hit")

    server = next(
        process
        for process in psutil.process_iter(["cmdline"])
        if "--port" in (process.info["cmdline"] or [])
        and str(fleet.servers[home]) in process.info["cmdline"]
    )
    server.send_signal(signal.SIGKILL)
    # paddlerd starts it again; its agent sees it go and come back.
    deadline = time.monotonic() + 30
    while fleet.agents()[home]["state"] == "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fleet.wait_idle(4, timeout=30)

    messages.append({"role": "user", "content": "Still there?"})
    upstream, expected, timings = turn(fleet, messages)
    assert expected == "miss"  # what it held died with it
    if upstream == home:
        assert timings["cache_n"] == 0


def test_a_prefix_counts_as_held_only_once_its_answer_begins(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    """Until its upstream answers, a request's prompt is not in that upstream's cache: a
    request with the same prefix meanwhile goes where it would go anyway, rather than
    crowd in behind the first (measured in bench W1: two sessions that opened together
    shared one server for their whole length)."""
    # Reports 10 s apart, the test run just after one: the balancer keeps thinking
    # upstream a idle while the test fills its slots behind its back.
    fleet = cache_fleet(paddlerd, llama_server_binary, tiny_model, interval=10.0)
    fleet.wait_for_report("a")
    deadline = time.monotonic() + 15
    management = f"http://127.0.0.1:{fleet.management}/api/v1/upstreams"
    direct = f"http://127.0.0.1:{fleet.servers['a']}/v1/chat/completions"
    first = conversation("Tell me about the Elbe.")
    answered: list[httpx.Response] = []

    def fill() -> None:
        # Read to its end: llama.cpp cancels a stream nobody reads.
        with httpx.stream("POST", direct, json=FILLER, timeout=120) as stream:
            for _ in stream.iter_lines():
                pass

    fillers = [threading.Thread(target=fill) for _ in range(2)]
    try:
        # Both of a's slots busy with clients of its own: what the balancer sends it now
        # waits inside llama.cpp, unanswered.
        for thread in fillers:
            thread.start()
        while fleet.busy_slots("a") != 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        httpx.post(f"{management}/b/drain", timeout=5).raise_for_status()
        waiting = threading.Thread(
            target=lambda: answered.append(
                httpx.post(
                    fleet.url("/v1/chat/completions"),
                    json={"messages": first, "max_tokens": 4},
                    timeout=60,
                )
            )
        )
        waiting.start()
        deadline = time.monotonic() + 10
        while fleet.agents()["a"]["reservations"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fleet.agents()["a"]["reservations"] == 1  # the first request is with a
        while fleet.deferred("a") != 1:  # ...and waits inside llama.cpp, unanswered
            assert time.monotonic() < deadline
            time.sleep(0.01)
        httpx.delete(f"{management}/b/drain", timeout=5).raise_for_status()

        second = conversation("Tell me about the Oder.")
        upstream, expected, _ = turn(fleet, second)
        assert (upstream, expected) == ("b", "miss")
        assert fleet.deferred("a") == 1  # still waiting: the check above meant something
    finally:
        for thread in fillers:
            thread.join(timeout=60)
    waiting.join(timeout=60)
    assert [response.status_code for response in answered] == [200]
    assert answered[0].headers["x-paddler-upstream"] == "a"
    # Answered now: the system prompt is held by both, and the least busy holder takes it.
    third = conversation("Tell me about the Main.")
    assert turn(fleet, third)[1] == "hit"


def slow_prefill_fleet(paddlerd: PaddlerdRunner, binary: Path, model: Path) -> Fleet:
    """Two upstreams of a model whose prefill takes time, routed cache_aware, with up to
    10 s of waiting for a busy holder."""
    fleet = start_fleet(
        paddlerd,
        binary,
        {"a": model, "b": model},
        balancer='routing_policy = "cache_aware"\ncache_max_wait = 10.0\n',
    )
    assert fleet.wait_idle(4, timeout=60)
    return fleet


def in_the_way(
    fleet: Fleet, messages: list[dict[str, str]], max_tokens: int, home: str
) -> tuple[threading.Thread, list[float]]:
    """A stream of ``messages``, a cache hit on ``home``, whose answer has begun when
    this returns; the time it ended goes to the list."""
    began = threading.Event()
    ended: list[float] = []

    def stream() -> None:
        body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
        with httpx.stream("POST", fleet.url("/v1/chat/completions"), json=body, timeout=60) as s:
            assert (s.headers["x-paddler-upstream"], s.headers["x-paddler-cache"]) == (
                home,
                "hit",
            )
            for _ in s.iter_lines():
                began.set()  # its answer began: its copy of the prompt is in use
        ended.append(time.monotonic())

    thread = threading.Thread(target=stream)
    thread.start()
    assert began.wait(timeout=30)
    return thread, ended


def asked_meanwhile(
    fleet: Fleet, messages: list[dict[str, str]], running: threading.Thread
) -> tuple[httpx.Response, float]:
    """The answer to ``messages``, sent while ``running`` streams, and when it was sent."""
    sent = time.monotonic()
    answer = httpx.post(
        fleet.url("/v1/chat/completions"),
        json={"messages": messages, "max_tokens": 4},
        timeout=60,
    )
    running.join(timeout=60)
    assert answer.status_code == 200, answer.text
    return answer, sent


def test_a_request_waits_for_a_busy_holder_when_that_beats_processing_its_prompt(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, bench_model: Path
) -> None:
    """With a model whose prefill takes time, a request whose prompt prefix is cached
    only in a slot in use waits for that slot (cache_max_wait, bounded by the prefill
    learned from llama.cpp's timings) and finds its prefix there, where the test below,
    on a model that processes a prompt in milliseconds, goes elsewhere at once. (The
    request in the way continues the first conversation, in its slot: the upstream has
    one copy of the system prompt, not two, as in the test after this one.)"""
    fleet = slow_prefill_fleet(paddlerd, llama_server_binary, bench_model)
    system = " ".join(f"river{number} carries boats to the sea." for number in range(120))
    opening = [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}]
    home, expected, timings = turn(fleet, opening)
    assert expected == "miss"
    # The premise: processing the system prompt takes several times what the request
    # in the way below takes to answer its 16 tokens.
    assert timings["prompt_ms"] > 300, timings

    # (16 tokens: still running when the next one is planned, on a loaded machine too, and
    # over well within the wait's budget, the system prompt's prefill.)
    first, ended = in_the_way(fleet, [*opening, {"role": "user", "content": "Why?"}], 16, home)
    where = [{"role": "system", "content": system}, {"role": "user", "content": "Where?"}]
    answer, sent = asked_meanwhile(fleet, where, first)
    assert (answer.headers["x-paddler-upstream"], answer.headers["x-paddler-cache"]) == (
        home,
        "hit",
    )
    assert answer.json()["timings"]["cache_n"] > 0  # llama.cpp agrees
    # The first was still running when it was sent; it waited for it to end (a slot
    # taken at once queues for a fraction of a millisecond), and says so.
    assert ended
    assert ended[0] > sent
    assert float(answer.headers["x-paddler-queue-ms"]) >= 10
    samples = scrape(fleet)
    assert samples["paddler_cache_holder_waits_total"] == {(("outcome", "freed"),): 1}
    # The wait for the holder is queue wait, in the histogram as in the header.
    waited = samples["paddler_cache_holder_wait_seconds_total"][(("outcome", "freed"),)]
    assert waited >= 0.01
    assert samples["paddler_queue_wait_seconds_sum"][()] >= waited


def test_a_prompt_saved_from_an_idle_slot_is_loaded_instead_of_waiting_for_its_holder(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, bench_model: Path
) -> None:
    """llama.cpp saves every idle slot's prompt to its host-memory cache as another task
    starts. So once a request with another prompt has run on the holder's other slot,
    the holder keeps a second copy of the system prompt there, and a request with it,
    sent while the first copy is in use, goes to the other slot at once, where llama.cpp
    loads it (bench W2, default host cache: such requests waited up to 0.9 s for the
    busy slot, where the test above waits). Such copies count where the upstream's agent
    told how much of idle slots' prompts its host cache keeps: llama.cpp's default 8 GiB
    over the bench model's 16 KiB of KV cache per token (8 layers, K and V of 512
    values at 2 bytes)."""
    fleet = slow_prefill_fleet(paddlerd, llama_server_binary, bench_model)
    management = f"http://127.0.0.1:{fleet.management}/api/v1/upstreams"
    agents = fleet.agents()
    assert [agents[name]["host_cache_tokens"] for name in ("a", "b")] == [8192 * 64] * 2

    system = " ".join(f"river{number} carries boats to the sea." for number in range(120))
    opening = [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}]
    home, expected, timings = turn(fleet, opening)
    assert expected == "miss"
    assert timings["prompt_ms"] > 300, timings  # as above: processing it takes a while
    # Another prompt on home's other slot (the other upstream drained meanwhile).
    away = "b" if home == "a" else "a"
    httpx.post(f"{management}/{away}/drain", timeout=5).raise_for_status()
    try:
        unrelated = conversation("Tell me about the Elbe.")
        assert turn(fleet, unrelated)[:2] == (home, "miss")
    finally:
        httpx.delete(f"{management}/{away}/drain", timeout=5).raise_for_status()
    assert fleet.wait_idle(4, timeout=10)

    first, ended = in_the_way(fleet, [*opening, {"role": "user", "content": "Why?"}], 16, home)
    where = [{"role": "system", "content": system}, {"role": "user", "content": "Where?"}]
    answer, sent = asked_meanwhile(fleet, where, first)
    assert (answer.headers["x-paddler-upstream"], answer.headers["x-paddler-cache"]) == (
        home,
        "hit",
    )
    # Not waited for: the first was still running when it was sent.
    assert float(answer.headers["x-paddler-queue-ms"]) < 10
    assert ended
    assert ended[0] > sent
    # llama.cpp loaded the saved prompt into the other slot: the system prompt came
    # from its cache.
    timings = answer.json()["timings"]
    assert timings["cache_n"] > 10 * timings["prompt_n"], timings
    assert "paddler_cache_holder_waits_total" not in scrape(fleet)


def test_a_host_cache_that_keeps_nothing_turns_saved_copies_off(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    """With llama.cpp's host-memory cache off (--cache-ram 0), a conversation whose slot
    two other prompts took finds nothing of its prompt at its next turn, where the
    balancer expected it from that cache: the host trust falls (paddler_cache_host_trust),
    and copies saved from idle slots do not count (nor would they anyway: the agent
    reports that the host cache keeps nothing)."""
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model},
        balancer='routing_policy = "cache_aware"\n',
        llama_extra=("--cache-ram", "0"),
    )
    assert fleet.wait_idle(2, timeout=30)
    assert fleet.agents()["a"]["host_cache_tokens"] == 0
    assert scrape(fleet)["paddler_cache_host_trust"][()] == 1.0
    danube = [{"role": "user", "content": "Tell me about the Danube. " * 30}]
    assert turn(fleet, danube)[:2] == ("a", "miss")
    for other in ("Name a colour. ", "Name a number. "):  # the second takes its slot
        turn(fleet, [{"role": "user", "content": other * 30}])
    danube.append({"role": "user", "content": "And the Rhine?"})
    timings = turn(fleet, danube)[2]
    assert timings["cache_n"] < timings["prompt_n"], timings  # nothing kept for it
    assert scrape(fleet)["paddler_cache_host_trust"][()] == 0.75


def test_a_new_conversation_takes_a_free_copy_of_a_shared_system_prompt_at_once(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, bench_model: Path
) -> None:
    """A second conversation went on from a system prompt where a first, more than
    twice its length, had: llama.cpp gives it the first one's slot and saves that
    conversation to its host-memory cache first, so the upstream holds the system
    prompt twice. While a request uses one copy, a third conversation is sent there at
    once, without waiting, and llama.cpp loads the system prompt from its cache (bench
    W1: waiting instead sent a new conversation to the other server's slots, over a
    conversation still going)."""
    fleet = slow_prefill_fleet(paddlerd, llama_server_binary, bench_model)
    system = " ".join(f"lake{number} feeds a river." for number in range(60))
    story = " ".join(f"tell me of town{number} by the water" for number in range(100))

    def opening(question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]

    home, expected, first = turn(fleet, opening(story))
    assert expected == "miss"
    assert first["prompt_ms"] > 300, first  # as above: processing it takes a while
    second = opening("Why?")
    assert turn(fleet, second)[:2] == (home, "hit")

    # (64 tokens: still running when the next one is planned.)
    going_on, ended = in_the_way(fleet, [*second, {"role": "user", "content": "Go on."}], 64, home)
    answer, sent = asked_meanwhile(fleet, opening("Where?"), going_on)
    assert (answer.headers["x-paddler-upstream"], answer.headers["x-paddler-cache"]) == (
        home,
        "hit",
    )
    # Not waited for: sent while the other copy was in use.
    assert float(answer.headers["x-paddler-queue-ms"]) < 10
    assert ended
    assert ended[0] > sent
    # And llama.cpp had it: most of the prompt came from its cache.
    timings = answer.json()["timings"]
    assert timings["cache_n"] > 10 * timings["prompt_n"], timings


def test_a_holder_whose_copy_is_busy_is_passed_over_until_it_is_free(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    """llama.cpp keeps a prompt in the one slot that processed it: while a request with
    that prefix runs there, a second one would process it again on another slot of the
    same server (measured in bench W2: a group's second request, sent to the holder of
    its system prompt, found nothing cached there and halved the first one's speed)."""
    fleet = cache_fleet(paddlerd, llama_server_binary, tiny_model, imbalance=2)
    # (cache_max_wait is on, as by default: the tiny model processes a prompt in far less
    # time than the stream below runs, so waiting for its slot is not worth it.)
    messages = conversation("Tell me about the Rhone.")
    home, _, _ = turn(fleet, messages)
    away = "b" if home == "a" else "a"
    going_on = {
        **FILLER,
        "messages": [*messages, {"role": "user", "content": "Go on."}],
        "max_tokens": 3000,  # within the slot's context, after the conversation so far
    }
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", fleet.url("/v1/chat/completions"), json=going_on) as stream,
    ):
        assert (stream.headers["x-paddler-upstream"], stream.headers["x-paddler-cache"]) == (
            home,
            "hit",
        )
        lines = stream.iter_lines()  # kept: a dropped reader closes its stream
        next(lines)  # its answer began: home's copy of the prefix is in use
        # One slot of home's two is free, within the imbalance allowed: only the busy
        # copy sends the same conversation elsewhere.
        assert fleet.agents()[home]["reservations"] == 1
        again = conversation("Tell me about the Rhone.")
        assert turn(fleet, again)[:2] == (away, "miss")
    # It waited for home first, within the tiny model's prefill time, in vain.
    waits = scrape(fleet)["paddler_cache_holder_waits_total"]
    assert waits == {(("outcome", "expired"),): 1}
    deadline = time.monotonic() + 10
    while fleet.agents()[home]["reservations"] and time.monotonic() < deadline:
        time.sleep(0.01)
    # Both hold it now, neither busy: a hit wherever it goes.
    assert turn(fleet, conversation("Tell me about the Rhone."))[1] == "hit"


@pytest.mark.parametrize("named", [True, False], ids=["slots named", "llama.cpp chooses"])
def test_a_new_conversation_takes_the_slot_of_one_that_ended_not_of_one_going_on(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path, named: bool
) -> None:
    """One upstream, two slots: a conversation that ended in one, a conversation going on
    in the other, both after the same system prompt. A new conversation after that
    prompt takes the slot of the one that ended, and the one going on finds its whole
    prompt cached at its next turn. Left to llama.cpp, the new conversation takes the
    first of the two by slot number, here the one going on (bench W1: that turn then
    processed over a thousand tokens again). The second case shows that it does."""
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model},
        balancer=f'routing_policy = "cache_aware"\ncache_pin_slots = {str(named).lower()}\n',
    )
    assert fleet.wait_idle(2, timeout=30)
    going_on = conversation("Tell me about the Thames, its locks, barges and bridges. " * 8)
    ended = {**FILLER, "messages": conversation("Tell me about the Loire.")}
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", fleet.url("/v1/chat/completions"), json=ended) as stream,
    ):
        lines = stream.iter_lines()  # kept: a dropped reader closes its stream
        next(lines)  # its answer began, in slot 1 (llama.cpp's first choice)
        turn(fleet, going_on)  # meanwhile in slot 0, the only one free
    # The one that ended was stopped mid-answer; its slot keeps its prompt.
    deadline = time.monotonic() + 30
    while fleet.busy_slots("a") or not fleet.wait_idle(2, timeout=1):
        assert time.monotonic() < deadline
    going_on.append({"role": "user", "content": "And the estuary?"})
    second = turn(fleet, going_on)[2]  # used after the other ended: the newer of the two
    held = second["prompt_n"] + second["cache_n"]

    answer = httpx.post(
        fleet.url("/v1/chat/completions"),
        json={"messages": conversation("Tell me about the Rhine."), "max_tokens": 8},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    if named:
        assert answer.headers["x-paddler-slot"] == "1"  # the slot of the one that ended
    else:
        assert "x-paddler-slot" not in answer.headers

    going_on.append({"role": "user", "content": "And the tides?"})
    third = turn(fleet, going_on)[2]
    if named:
        # Its whole prompt so far was still in its slot.
        assert third["cache_n"] >= 0.9 * held, (third, held)
        # A client that names a slot itself keeps it: llama.cpp gets what it sent.
        own = httpx.post(
            fleet.url("/v1/chat/completions"),
            json={"messages": conversation("Hi."), "max_tokens": 2, "id_slot": 0},
            timeout=60,
        )
        assert own.status_code == 200, own.text
        assert "x-paddler-slot" not in own.headers
    else:
        # Only the system prompt was left: the new conversation took its slot.
        assert third["cache_n"] < 0.5 * held, (third, held)
