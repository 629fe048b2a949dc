"""OpenTelemetry traces of a real fleet's requests, received by a local OTLP/HTTP
collector of the test's own that decodes them with the official message classes."""

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from paddler.testbed.ports import free_port
from tests.integration.fleet import start_fleet
from tests.integration.harness import PaddlerdRunner

pytestmark = pytest.mark.llamacpp

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.content_types: set[str] = set()
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with collector.lock:
                    collector.content_types.add(self.headers["Content-Type"])
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            collector.spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def wait_for(self, count: int, name_prefix: str, timeout: float = 15) -> list[Any]:
        """The spans received, once ``count`` of them have names that start so (the
        /health polls of the fleet's start come as spans too)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if sum(span.name.startswith(name_prefix) for span in self.spans) >= count:
                    return list(self.spans)
            time.sleep(0.1)
        raise AssertionError(f"{len(self.spans)} spans after {timeout}s, wanted {count}")


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def attributes(span: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in span.attributes:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind)
    return values


def test_every_proxied_request_is_a_span_with_its_upstream_wait_and_first_token(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path, collector: Collector
) -> None:
    endpoint = f"http://127.0.0.1:{collector.port}/v1/traces"
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model, "b": tiny_model},
        balancer=f'otlp_traces_endpoint = "{endpoint}"\notlp_service_name = "edge"\n',
    )
    assert fleet.wait_idle(4, timeout=30)
    joined = httpx.post(
        fleet.url("/completion"),
        json={"prompt": "Hi", "n_predict": 2},
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        timeout=30,
    )
    assert joined.status_code == 200
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", fleet.url("/v1/chat/completions"), json=body, timeout=30) as answer:
        assert answer.status_code == 200
        answer.read()
    missing = httpx.post(fleet.url("/completion"), json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404

    spans = collector.wait_for(3, "POST ")
    assert collector.content_types == {"application/x-protobuf"}
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)

    completion = next(
        s for s in by_name["POST /completion"] if attributes(s)["http.response.status_code"] == 200
    )
    assert completion.trace_id.hex() == TRACE_ID  # the client's trace goes on
    assert completion.parent_span_id.hex() == PARENT_ID
    assert completion.kind == 2
    values = attributes(completion)
    assert values["paddler.upstream"] in {"a", "b"}
    assert values["paddler.request_id"] == joined.headers["x-request-id"]
    assert values["paddler.retries"] == 0
    assert values["paddler.queue_wait_ms"] >= 0
    assert completion.end_time_unix_nano > completion.start_time_unix_nano

    (streamed,) = by_name["POST /v1/chat/completions"]
    values = attributes(streamed)
    assert values["paddler.time_to_first_token_ms"] > 0
    duration_ms = (streamed.end_time_unix_nano - streamed.start_time_unix_nano) / 1e6
    assert values["paddler.time_to_first_token_ms"] <= duration_ms + 1
    assert streamed.trace_id.hex() != TRACE_ID  # no traceparent: a trace of its own
    assert streamed.parent_span_id == b""

    refused = next(
        s for s in by_name["POST /completion"] if attributes(s)["http.response.status_code"] == 404
    )
    assert attributes(refused)["paddler.upstream"] == "none"
    assert refused.status.code == 0  # a 4xx is the client's error, not the span's


def test_a_collector_that_is_down_costs_spans_never_requests(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path
) -> None:
    nowhere = free_port()  # nothing listens there
    fleet = start_fleet(
        paddlerd,
        llama_server_binary,
        {"a": tiny_model},
        balancer=f'otlp_traces_endpoint = "http://127.0.0.1:{nowhere}/v1/traces"\n',
    )
    for _ in range(5):
        answer = httpx.post(fleet.url("/completion"), json={"prompt": "Hi", "n_predict": 2})
        assert answer.status_code == 200
    paddlerd.wait_for_log(r"OTLP http://127\.0\.0\.1:\d+/v1/traces: .*span\(s\) lost")
    time.sleep(2.5)  # more export rounds fail: the warning is not repeated each time
    assert paddlerd.log().count("span(s) lost") <= 2  # at most once per worker
