"""The original Paddler's two commands, typed as its README shows them."""

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from paddler.testbed.ports import free_port

pytestmark = pytest.mark.llamacpp


class FakeInstanceMetadata(http.server.BaseHTTPRequestHandler):
    """EC2's instance metadata service (IMDSv2), as much as the agent uses of it."""

    def do_PUT(self) -> None:
        assert self.path == "/latest/api/token"
        assert self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self._answer(b"session-token")

    def do_GET(self) -> None:
        assert self.path == "/latest/meta-data/local-ipv4"
        if self.headers["X-aws-ec2-metadata-token"] != "session-token":
            self.send_response(401)
            self.end_headers()
            return
        self._answer(b"127.0.0.1")

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def metadata_service() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeInstanceMetadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def paddler(*arguments: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "paddler", *arguments], stdout=output, stderr=subprocess.STDOUT
        )


def registered(port: int) -> list[dict[str, object]]:
    try:
        agents: list[dict[str, object]] = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/agents", timeout=2
        ).json()["agents"]
    except httpx.TransportError:
        return []
    return agents


def test_seed_commands_register_the_agent_with_the_balancer(
    llama_server_binary: Path,
    tiny_model: Path,
    tmp_path: Path,
    metadata_service: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    llama_port, management, proxy = free_port(), free_port(), free_port()
    processes.append(
        subprocess.Popen(
            [
                str(llama_server_binary),
                "-m",
                str(tiny_model),
                "--port",
                str(llama_port),
                "-np",
                "2",
                "-c",
                "512",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    balancer_log = tmp_path / "balancer.log"
    processes.append(
        paddler(
            "balancer",
            "--management-host",
            "127.0.0.1",
            "--management-port",
            str(management),
            "--reverseproxy-host",
            "127.0.0.1",
            "--reverseproxy-port",
            str(proxy),
            "--routing-policy",
            "least_busy",
            log=balancer_log,
        )
    )
    processes.append(
        paddler(
            "agent",
            "--external-llamacpp-host",
            "127.0.0.1",
            "--external-llamacpp-port",
            str(llama_port),
            "--local-llamacpp-host",
            "127.0.0.1",
            "--local-llamacpp-port",
            str(llama_port),
            "--management-host",
            "127.0.0.1",
            "--management-port",
            str(management),
            log=tmp_path / "agent.log",
        )
    )

    deadline = time.monotonic() + 30
    while not registered(management) and time.monotonic() < deadline:
        time.sleep(0.1)
    (agent,) = registered(management)
    assert agent["address"] == f"127.0.0.1:{llama_port}"
    assert agent["slots"] == {"total": 2, "idle": 2, "processing": 0, "free": 2}
    assert agent["in_rotation"] is True
    assert "routing least_busy" in balancer_log.read_text()

    # A second agent whose address comes from EC2's metadata service, with a name.
    processes.append(
        paddler(
            "agent",
            "--external-llamacpp-host",
            "aws:metadata:local-ipv4",
            "--external-llamacpp-port",
            "9",
            "--local-llamacpp-port",
            str(llama_port),
            "--management-port",
            str(management),
            "--name",
            "from-ec2",
            "--aws-metadata-url",
            metadata_service,
            log=tmp_path / "agent2.log",
        )
    )
    deadline = time.monotonic() + 30
    while len(registered(management)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    by_name = {str(a["name"]): a for a in registered(management)}
    assert by_name["from-ec2"]["address"] == "127.0.0.1:9"

    # The slot table lives under /run/paddler by default, and goes with the balancer.
    table = Path(f"/run/paddler/balancer-{management}.slots")
    assert table.exists()
    balancer = processes[1]
    balancer.terminate()
    assert balancer.wait(30) == 0
    assert not table.exists()


def test_bad_flags_name_the_flag() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "paddler",
            "agent",
            "--local-llamacpp-port",
            "70000",
            "--management-host",
            "not a host",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78
    assert "paddler agent: --local-llamacpp-port: must be a port from 1 to 65535, not 70000" in (
        result.stderr
    )
    assert "paddler agent: --management-host/--management-port: must be host:port entries" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_balancer_flag_outside_its_choices_is_named() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "paddler", "balancer", "--routing-policy", "fastest"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78
    assert "paddler balancer: --routing-policy: " in result.stderr
    assert "fastest" in result.stderr
    assert "Traceback" not in result.stderr
