"""paddlerd --check-config, as an operator runs it."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "paddler" / "paddler.toml"


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paddler.supervisor.cli", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def line_number(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_the_shipped_example_is_valid() -> None:
    result = check(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_misspelled_key_exits_78_naming_key_and_line(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("reverseproxy_port = 8080", "reverseproxy_prot = 8080")
    path = tmp_path / "paddler.toml"
    path.write_text(text)
    result = check(path)
    assert result.returncode == 78
    line = line_number(text, "reverseproxy_prot")
    assert (
        f"{path}:{line}: balancer.reverseproxy_prot: unknown key (did you mean "
        "'reverseproxy_port'?)"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_type_exits_78_naming_key_and_line(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("stop_timeout = 30.0", 'stop_timeout = "30s"')
    path = tmp_path / "paddler.toml"
    path.write_text(text)
    result = check(path)
    assert result.returncode == 78
    line = line_number(text, "stop_timeout = ")
    assert (
        f"{path}:{line}: paddlerd.stop_timeout: must be a number, not the string '30s'"
        in result.stderr
    )


def test_missing_model_file_exits_78_naming_key_and_line(tmp_path: Path) -> None:
    text = EXAMPLE.read_text() + (
        f'\n[[llamacpp]]\nname = "a"\nport = 9001\nbinary = "{sys.executable}"\n'
        'model = "models/missing.gguf"\n'
    )
    path = tmp_path / "paddler.toml"
    path.write_text(text)
    result = check(path)
    assert result.returncode == 78
    line = line_number(text, "models/missing.gguf")
    assert (
        f"{path}:{line}: llamacpp[0].model: no such file: {tmp_path}/models/missing.gguf"
        in result.stderr
    )
    assert "nothing was started" in result.stderr


def test_missing_configuration_file_exits_78(tmp_path: Path) -> None:
    result = check(tmp_path / "absent.toml")
    assert result.returncode == 78
    assert f"{tmp_path}/absent.toml: file not found" in result.stderr
