"""The web dashboard, in headless Chromium (Debian's package), showing a real fleet."""

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest

from tests.integration.fleet import start_fleet
from tests.integration.harness import PaddlerdRunner

pytestmark = pytest.mark.llamacpp

WIDTH, HEIGHT = 1280, 720
HOSTILE_NAME = '<img src=x onerror="document.title=1">'


def chromium(profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("Chromium is not installed (make test installs Debian's chromium as root)")
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",  # the tests run as root
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            # This machine reaches no host but its own: no background connections.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            # Lets the page's script fetch the fleet and draw it before the capture.
            "--virtual-time-budget=4000",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decompressed scanlines of a PNG file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            chunks.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    return width, height, zlib.decompress(b"".join(chunks))


def test_the_dashboard_shows_the_fleet_in_a_browser(
    paddlerd: PaddlerdRunner, llama_server_binary: Path, tiny_model: Path, tmp_path: Path
) -> None:
    fleet = start_fleet(paddlerd, llama_server_binary, {"a": tiny_model, "b": tiny_model})
    assert fleet.wait_idle(4, timeout=30)
    for _ in range(3):
        answer = httpx.post(fleet.url("/completion"), json={"prompt": "Hi", "n_predict": 2})
        assert answer.status_code == 200
    # An agent's text reaches the page as text, never as markup.
    hostile = {
        "sequence": 1,
        "interval": 3600,
        "name": HOSTILE_NAME,
        "upstream": {"host": "127.0.0.1", "port": 9},
        "state": "unreachable",
        "slots": {"total": 0, "idle": 0, "processing": 0},
        "model": "",
        "build": "",
        "error": "connection refused",
    }
    base = f"http://127.0.0.1:{fleet.management}"
    httpx.put(f"{base}/api/v1/agents/hostile", json=hostile, timeout=5).raise_for_status()

    page = httpx.get(f"{base}/dashboard", timeout=5)
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace(base, "")  # no asset from anywhere: works offline

    dom = chromium(tmp_path / "profile-dom", "--dump-dom", f"{base}/dashboard")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<b id="slots">0/4</b>' in html
    assert '<b id="queued">0</b>' in html
    for name, port in fleet.servers.items():
        row = next(line for line in html.split("<tr>") if f"<td>{name}</td>" in line)
        assert f"<td>127.0.0.1:{port}</td>" in row
        assert '<td class="state-ready">ready</td>' in row
        assert "0/2" in row
    assert "&lt;img src=x onerror=" in html
    assert "<img" not in html
    assert "3 upstreams" in html

    shot = tmp_path / "dashboard.png"
    taken = chromium(tmp_path / "profile-shot", f"--screenshot={shot}", f"{base}/dashboard")
    assert taken.returncode == 0, taken.stderr[-2000:]
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    # Not a blank page: text, table lines and bars make many distinct bytes.
    assert len(set(pixels)) > 20
