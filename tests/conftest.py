import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import paddler
from paddler.testbed.llama_server import binary_path, ensure_llama_server
from paddler.testbed.models import write_model
from tests.integration.harness import PaddlerdRunner


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """A real llama-server, built once per machine (``make test`` builds it beforehand)."""
    return ensure_llama_server()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny", seed=1)


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmarks' ~28M-parameter model: prefill costs like a small real model's."""
    return write_model(tmp_path_factory.mktemp("models") / "bench.gguf", "bench", seed=1)


@pytest.fixture
def paddlerd(tmp_path: Path) -> Iterator[PaddlerdRunner]:
    runner = PaddlerdRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.kill_everything()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which real llama-server the llamacpp tests run against, and whether the
    balancer's hot path under test is the compiled one that ships."""
    hot_path = f"paddler hot path: {paddler.HOT_PATH}"
    binary = binary_path()
    if not binary.exists():
        return [f"llama-server: not built yet ({binary})", hot_path]
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    first = (version.stdout + version.stderr).strip().splitlines()[:1]
    return [f"llama-server: {binary} ({first[0] if first else 'unknown version'})", hot_path]
