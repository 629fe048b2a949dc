"""Headers through the proxy, against an upstream that echoes what it received.

What llama-server does with headers is not the question here, so the upstream is a
small echo server registered through the management API like any agent's upstream.
"""

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from paddler.llamacpp.client import UpstreamStatus
from paddler.reports import build_report
from paddler.slots import UpstreamState
from paddler.testbed.ports import free_port
from tests.integration.harness import PaddlerdRunner


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        body = httpx.Headers(dict(self.headers)).get("host", "").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "keep-alive")
        self.send_header("X-Echo-Request-Id", self.headers.get("X-Request-Id", ""))
        self.send_header("X-Echo-Authorization", self.headers.get("Authorization", ""))
        self.send_header("X-Echo-Secret", self.headers.get("X-Secret", "absent"))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def balancer(paddlerd: PaddlerdRunner, extra: str, upstream: int) -> int:
    proxy, management = free_port(), free_port()
    paddlerd.write_config(
        f"[balancer]\nmanagement_port = {management}\nreverseproxy_port = {proxy}\n"
        f'workers = 1\nslot_table = "{paddlerd.directory}/slots"\n{extra}'
    )
    paddlerd.start()
    paddlerd.wait_for_log(r"ready: 1 running")
    status = UpstreamStatus(UpstreamState.READY, slots_total=4, slots_idle=4, model="echo")
    report = build_report(
        status, sequence=1, interval=3600, name="echo", host="127.0.0.1", port=upstream
    )
    httpx.put(
        f"http://127.0.0.1:{management}/api/v1/agents/echo", json=report, timeout=5
    ).raise_for_status()
    return proxy


@pytest.mark.parametrize(("rewrite", "expected"), [(False, "client.example"), (True, None)])
def test_host_header_is_the_clients_unless_rewritten(
    paddlerd: PaddlerdRunner, echo: int, rewrite: bool, expected: str | None
) -> None:
    proxy = balancer(paddlerd, f"rewrite_host_header = {str(rewrite).lower()}\n", echo)
    answer = httpx.post(
        f"http://127.0.0.1:{proxy}/completion",
        json={"prompt": "x"},
        headers={
            "Host": "client.example",
            "X-Request-Id": "abc123",
            "Authorization": "Bearer client-key",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "1",
        },
        timeout=10,
    )
    assert answer.status_code == 200
    assert answer.text == (expected or f"127.0.0.1:{echo}")
    # The request id travels both ways; the client's own key reaches the upstream when
    # the balancer neither checks keys nor has one of its own to send.
    assert answer.headers["x-request-id"] == "abc123"
    assert answer.headers["x-echo-request-id"] == "abc123"
    assert answer.headers["x-echo-authorization"] == "Bearer client-key"
    # A header the client named in Connection is for this hop only.
    assert answer.headers["x-echo-secret"] == "absent"
