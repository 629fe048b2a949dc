"""Paddler's hand-written OTLP encoding, read back with the official message classes."""

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from paddler.tracing.otlp import Span, encode_request, trace_context, traceparent


def test_spans_decode_with_the_official_definitions() -> None:
    spans = [
        Span(
            trace_id=bytes(range(16)),
            span_id=b"\x01" * 8,
            parent_id=b"\x02" * 8,
            name="POST /v1/chat/completions",
            start_ns=1_700_000_000_000_000_000,
            end_ns=1_700_000_000_250_000_000,
            attributes={
                "paddler.upstream": "gpu0",
                "http.response.status_code": 200,
                "paddler.queue_wait_ms": 12.5,
                "paddler.streamed": True,
                "paddler.retries": 0,
            },
        ),
        Span(b"\x03" * 16, b"\x04" * 8, b"", "POST /completion", 5, 9, {}, "answered 502"),
    ]
    raw = encode_request(spans, {"service.name": "paddler", "process.pid": 42}, "0.1.0")
    request = ExportTraceServiceRequest.FromString(raw)

    (resource_spans,) = request.resource_spans
    resource = {kv.key: kv.value for kv in resource_spans.resource.attributes}
    assert resource["service.name"].string_value == "paddler"
    assert resource["process.pid"].int_value == 42
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("paddler", "0.1.0")
    first, second = scope_spans.spans
    assert first.trace_id == bytes(range(16))
    assert (first.span_id, first.parent_span_id) == (b"\x01" * 8, b"\x02" * 8)
    assert first.name == "POST /v1/chat/completions"
    assert first.kind == 2  # SPAN_KIND_SERVER
    assert first.end_time_unix_nano - first.start_time_unix_nano == 250_000_000
    attributes = {kv.key: kv.value for kv in first.attributes}
    assert attributes["paddler.upstream"].string_value == "gpu0"
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["paddler.queue_wait_ms"].double_value == 12.5
    assert attributes["paddler.streamed"].bool_value is True
    assert attributes["paddler.retries"].HasField("int_value")
    assert first.status.code == 0  # unset: no error
    assert (second.parent_span_id, second.status.code) == (b"", 2)
    assert second.status.message == "answered 502"


def test_a_traceparent_continues_its_trace_and_garbage_starts_a_new_one() -> None:
    header = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    trace_id, parent = trace_context(header)
    assert trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parent.hex() == "00f067aa0ba902b7"
    assert traceparent(trace_id, b"\xaa" * 8) == (
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-aaaaaaaaaaaaaaaa-01"
    )
    for bad in (
        None,
        b"",
        b"garbage",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ):
        fresh, no_parent = trace_context(bad)
        assert len(fresh) == 16
        assert no_parent == b""
