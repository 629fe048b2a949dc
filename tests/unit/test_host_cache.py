"""What the agent tells of llama.cpp's host-memory prompt cache: its size in tokens, from
llama-server's command line, environment and model file."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

from paddler.llamacpp.client import UpstreamStatus
from paddler.llamacpp.host_cache import (
    HostCacheError,
    cache_settings,
    host_cache_tokens,
    kv_bytes_per_token,
    this_host_addresses,
)
from paddler.reports import ReportError, build_report, parse_report
from paddler.slots.layout import UNLIMITED_HOST_CACHE, UpstreamState
from paddler.testbed.models import SHAPES, write_model

STATUS = UpstreamStatus(UpstreamState.READY, slots_total=2, slots_idle=2, model="m", build="b1")

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny")


def test_the_bytes_per_token_are_the_models_k_and_v_at_the_cache_types(tiny_model: Path) -> None:
    shape = SHAPES["tiny"]
    per_layer = shape.embedding  # K or V of every head, head_count_kv == head_count
    assert kv_bytes_per_token(tiny_model, "f16", "f16") == shape.layers * per_layer * 2 * 2
    assert kv_bytes_per_token(tiny_model, "q8_0", "f32") == shape.layers * per_layer * (34 / 32 + 4)


def test_grouped_query_attention_and_per_layer_head_counts_are_read(tmp_path: Path) -> None:
    """head_count_kv below head_count (grouped queries), or one per layer, with 0 for a
    layer without attention; key_length and value_length where the model gives them."""
    path = tmp_path / "gqa.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_embedding_length(256)
    writer.add_head_count(8)
    writer.add_array("llama.attention.head_count_kv", [2, 0, 4])
    writer.add_key_length(64)
    writer.add_value_length(32)
    writer.add_token_list(["a", "b", "c"])  # an array of strings, skipped
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert kv_bytes_per_token(path, "f16", "f16") == (6 * 64 + 6 * 32) * 2


@pytest.mark.parametrize(
    "content",
    [
        b"GGUF\x03\x00\x00\x00" + b"\xff" * 20,  # truncated
        b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x01" + b"\x00" * 7 + b"\xff" * 28,
        # one key whose length says 2**63 bytes, in a file of 60
        b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x01" + b"\x00" * 7 + b"\xff" * 7 + b"\x7f",
        b"PK\x03\x04 a zip file, say",
    ],
)
def test_a_file_that_is_not_a_model_is_named_in_the_error(tmp_path: Path, content: bytes) -> None:
    """Whatever the bytes claim, nothing past the file is read or allocated."""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(content)
    with pytest.raises(HostCacheError, match=r"garbage\.gguf is no GGUF file"):
        kv_bytes_per_token(garbage, "f16", "f16")


def test_a_model_without_what_the_size_needs_says_what_it_lacks(tmp_path: Path) -> None:
    path = tmp_path / "headless.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_head_count(8)
    writer.add_array("llama.attention.head_count_kv", [1] * 200_000)  # past MAX_LAYERS
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(HostCacheError, match=r"has no llama\.embedding_length"):
        kv_bytes_per_token(path, "f16", "f16")
    with pytest.raises(HostCacheError, match=r"cannot read the model .*missing\.gguf"):
        kv_bytes_per_token(tmp_path / "missing.gguf", "f16", "f16")


def test_settings_come_from_the_arguments_then_the_environment_then_the_defaults() -> None:
    defaults = cache_settings(["llama-server"], {})
    assert (defaults.cache_ram_mib, defaults.cache_type_k, defaults.idle_slots) == (
        8192,
        "f16",
        True,
    )
    environ = {"LLAMA_ARG_CACHE_RAM": "64", "LLAMA_ARG_CACHE_TYPE_V": "q4_0"}
    argv = ["llama-server", "-m", "/m.gguf", "--cache-ram=32", "-ctk", "q8_0", "-cram", "16"]
    settings = cache_settings(argv, environ)
    assert (
        settings.cache_ram_mib,
        settings.cache_type_k,
        settings.cache_type_v,
        settings.model,
    ) == (16, "q8_0", "q4_0", "/m.gguf")
    assert not cache_settings(["llama-server", "--no-cache-idle-slots"], {}).idle_slots
    for off in ("0", "false", "off", "disabled"):
        environ = {"LLAMA_ARG_CACHE_IDLE_SLOTS": off}
        assert not cache_settings(["llama-server"], environ).idle_slots
    with pytest.raises(HostCacheError, match="--cache-ram 'lots' is not a number"):
        cache_settings(["llama-server", "--cache-ram", "lots"], {})
    with pytest.raises(HostCacheError, match="unknown KV cache type 'q3_k'"):
        cache_settings(["llama-server", "-ctv", "q3_k"], {})


@contextlib.contextmanager
def serving(
    *argv: str, cwd: Path | None = None, address: str = "127.0.0.1", port: int = 0
) -> Iterator[int]:
    """A process listening here on a port of its own, with these arguments (and none of
    llama.cpp's variables in its environment), as a llama-server started with them
    would: the port."""
    if not port:
        with socket.socket() as probe:
            probe.bind((address, 0))
            port = probe.getsockname()[1]
    # A script file, not python -c: llama-server's -c is its context size.
    listener = Path(tempfile.mkdtemp()) / "listener.py"
    listener.write_text(
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
        "print('up', flush=True); time.sleep(60)\n"
    )
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LLAMA_")}
    process = subprocess.Popen(
        [sys.executable, str(listener), address, str(port), *argv],
        stdout=subprocess.PIPE,
        text=True,
        env=environ,
        cwd=cwd,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "up\n"
        yield port
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(listener.parent)


def test_the_process_listening_on_the_port_is_the_one_read(tiny_model: Path) -> None:
    per_token = int(kv_bytes_per_token(tiny_model, "f16", "f16"))
    with serving("--cache-ram", "1", "-m", str(tiny_model)) as port:
        assert host_cache_tokens("127.0.0.1", port, "") == MIB // per_token
        assert host_cache_tokens("localhost", port, "") == MIB // per_token
    # Gone: nothing listens there any more.
    with pytest.raises(HostCacheError, match=f"no process of this user listens on port {port}"):
        host_cache_tokens("127.0.0.1", port, str(tiny_model))
    # The model /props names, where the command line names none; llama.cpp's default size.
    with serving() as port:
        assert host_cache_tokens("127.0.0.1", port, str(tiny_model)) == 8192 * MIB // per_token
        with pytest.raises(HostCacheError, match="names no model file"):
            host_cache_tokens("127.0.0.1", port, "")
    # A model named relative to llama-server's working directory, not the agent's.
    with serving("-m", tiny_model.name, cwd=tiny_model.parent) as port:
        assert host_cache_tokens("127.0.0.1", port, "") == 8192 * MIB // per_token
    # No cache, or no saves of idle slots: none kept. No size limit: as many tokens as
    # the context holds (--ctx-size, else the model's).
    for argv, tokens in (
        (("--cache-ram", "0"), 0),
        (("--no-cache-idle-slots",), 0),
        (("-cram", "-1", "-m", str(tiny_model), "-c", "1000"), 1000),
        (("-cram", "-1", "-m", str(tiny_model)), SHAPES["tiny"].context),
    ):
        with serving(*argv) as port:
            assert host_cache_tokens("127.0.0.1", port, "") == tokens
    # Two processes on the port, on two addresses: the one the agent's address names.
    with (
        serving("-cram", "0", address="127.0.0.2") as port,
        serving("-cram", "1", "-m", str(tiny_model), port=port),
    ):
        assert host_cache_tokens("127.0.0.1", port, "") == MIB // per_token
        assert host_cache_tokens("127.0.0.2", port, "") == 0
    # A llama-server on another host is out of sight.
    with pytest.raises(HostCacheError, match=r"192\.0\.2\.1 is not this host"):
        host_cache_tokens("192.0.2.1", port, str(tiny_model))
    assert this_host_addresses("::1")
    assert not this_host_addresses("no-such-host.invalid")


def test_the_report_carries_the_size_and_refuses_a_wrong_one() -> None:
    report = build_report(STATUS, sequence=1, interval=1.0, name="a", host="127.0.0.1", port=8080)
    assert "host_cache_tokens" not in report  # unknown: not sent
    assert parse_report("agent1", report).host_cache_tokens == 0
    report = build_report(
        STATUS,
        sequence=1,
        interval=1.0,
        name="a",
        host="127.0.0.1",
        port=8080,
        host_cache_tokens=UNLIMITED_HOST_CACHE,
    )
    assert parse_report("agent1", report).host_cache_tokens == UNLIMITED_HOST_CACHE
    for wrong in (-1, True, 1.5, "many", UNLIMITED_HOST_CACHE + 1):
        report["host_cache_tokens"] = wrong
        with pytest.raises(ReportError, match="field 'host_cache_tokens' must be a whole number"):
            parse_report("agent1", report)
