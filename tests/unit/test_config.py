import sys
from pathlib import Path

import pytest

from paddler.config import ConfigError, parse_config
from paddler.config.locate import locate_keys

EXECUTABLE = sys.executable


def problems(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "paddler.toml")
    return [problem.render("f") for problem in caught.value.problems]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def llamacpp(model: Path, name: str = "a", port: int = 8081, extra: str = "") -> str:
    return (
        f'[[llamacpp]]\nname = "{name}"\nmodel = "{model}"\nport = {port}\n'
        f'binary = "{EXECUTABLE}"\n{extra}'
    )


def test_a_full_configuration_becomes_typed_settings(tmp_path: Path, model: Path) -> None:
    text = (
        "[paddlerd]\nstop_timeout = 5\n"
        "[balancer]\nmanagement_port = 9000\n"
        '[[agent]]\nlocal_llamacpp_port = 8081\nname = "gpu0"\n'
        + llamacpp(
            model, extra='extra_args = ["--metrics"]\nenv = { A = "1" }\ncontext_size = 2048\n'
        )
    )
    config = parse_config(text, tmp_path / "paddler.toml")
    assert config.paddlerd.stop_timeout == 5.0
    assert isinstance(config.paddlerd.stop_timeout, float)
    assert config.balancer is not None
    assert config.balancer.management_port == 9000
    assert config.balancer.reverseproxy_port == 8080
    assert [agent.name for agent in config.agents] == ["gpu0"]
    (instance,) = config.llamacpps
    assert (instance.model, instance.slots, instance.context_size) == (str(model), 4, 2048)
    assert instance.extra_args == ["--metrics"]
    assert instance.env == {"A": "1"}


def test_relative_model_paths_start_at_the_configuration_file(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"")
    config = parse_config(
        f'[[llamacpp]]\nname = "a"\nmodel = "models/m.gguf"\nport = 1\nbinary = "{EXECUTABLE}"\n',
        tmp_path / "paddler.toml",
    )
    assert config.llamacpps[0].model == str(tmp_path / "models" / "m.gguf")


def test_unknown_key_names_the_key_its_line_and_a_suggestion(tmp_path: Path) -> None:
    found = problems("[balancer]\n\nmanagment_port = 1\n", tmp_path)
    assert found == ["f:3: balancer.managment_port: unknown key (did you mean 'management_port'?)"]


def test_unknown_section(tmp_path: Path) -> None:
    assert problems("[balancers]\n", tmp_path) == [
        "f:1: balancers: unknown section (did you mean 'balancer'?)"
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'management_port = "8085"',
            "balancer.management_port: must be an integer, not the string '8085'",
        ),
        (
            "management_port = true",
            "balancer.management_port: must be an integer, not the boolean true",
        ),
        (
            "management_port = 8085.5",
            "balancer.management_port: must be an integer, not the number 8085.5",
        ),
        ("management_port = 0", "balancer.management_port: must be a port from 1 to 65535, not 0"),
        (
            'management_host = "not an address!"',
            "balancer.management_host: is not a valid IP address or host name: 'not an address!'",
        ),
        (
            'management_host = "300.1.1.1"',
            "balancer.management_host: is not a valid IP address or host name: '300.1.1.1'",
        ),
    ],
)
def test_wrong_values_name_key_and_line(tmp_path: Path, line: str, message: str) -> None:
    assert problems(f"[balancer]\n{line}\n", tmp_path) == [f"f:2: {message}"]


def test_host_names_and_ipv6_are_valid_addresses(tmp_path: Path) -> None:
    config = parse_config(
        '[balancer]\nmanagement_host = "::1"\nreverseproxy_host = "balancer.internal"\n',
        tmp_path / "p.toml",
    )
    assert config.balancer is not None
    assert config.balancer.reverseproxy_host == "balancer.internal"


def test_missing_model_file(tmp_path: Path) -> None:
    text = llamacpp(tmp_path / "nope.gguf")
    assert problems(text, tmp_path) == [
        f"f:3: llamacpp[0].model: no such file: {tmp_path / 'nope.gguf'}"
    ]


def test_missing_binary_default_is_reported_at_the_table(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    text = f'\n[[llamacpp]]\nname = "a"\nmodel = "{model}"\nport = 1\n'
    assert problems(text, tmp_path) == [
        "f:2: llamacpp[0].binary: 'llama-server' is not found in PATH; give its full path"
    ]


def test_required_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert problems("[[llamacpp]]\n", tmp_path) == [
        "f:1: llamacpp[0].name: is required",
        "f:1: llamacpp[0].model: is required",
        "f:1: llamacpp[0].port: is required",
        "f:1: llamacpp[0].binary: 'llama-server' is not found in PATH; give its full path",
    ]


def test_two_listeners_on_one_port(tmp_path: Path, model: Path) -> None:
    text = "[balancer]\nmanagement_port = 8081\n" + llamacpp(model, port=8081)
    assert problems(text, tmp_path) == [
        "f:6: llamacpp[0].port: port 8081 is already taken by balancer.management_port"
    ]


def test_same_port_on_different_addresses_is_fine_but_not_with_a_wildcard(
    tmp_path: Path, model: Path
) -> None:
    text = llamacpp(model, "a", 9000, 'host = "127.0.0.1"\n') + llamacpp(
        model, "b", 9000, 'host = "127.0.0.2"\n'
    )
    assert len(parse_config(text, tmp_path / "p.toml").llamacpps) == 2
    clash = text + llamacpp(model, "c", 9000, 'host = "0.0.0.0"\n')
    assert problems(clash, tmp_path) == [
        "f:16: llamacpp[2].port: port 9000 is already taken by llamacpp[0].port"
    ]


def test_duplicate_instance_names(tmp_path: Path, model: Path) -> None:
    text = llamacpp(model, "a", 1) + llamacpp(model, "a", 2)
    assert problems(text, tmp_path) == [
        "f:7: llamacpp[1].name: 'a' is already the name of llamacpp[0]"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        '[paddlerd]\nfatal_after = 0\nlog_level = "loud"\n[balancer]\nx = 1\n', tmp_path
    )
    assert found == [
        "f:2: paddlerd.fatal_after: must be at least 1, not 0",
        "f:3: paddlerd.log_level: must be one of debug, info, warning, error; not 'loud'",
        "f:5: balancer.x: unknown key",
    ]


def test_tables_written_with_the_wrong_brackets(tmp_path: Path) -> None:
    assert problems("[[balancer]]\n[llamacpp]\n", tmp_path) == [
        "f:1: balancer: must be a table, written [balancer]",
        "f:2: llamacpp: must be written [[llamacpp]] (an array of tables)",
    ]


def test_invalid_toml_names_its_line(tmp_path: Path) -> None:
    (found,) = problems("[balancer]\nmanagement_port = = 1\n", tmp_path)
    assert found.startswith("f:2: not valid TOML: ")


def test_locating_keys_in_arrays_subtables_and_multiline_values() -> None:
    text = "\n".join(
        [
            "[[llamacpp]]",  # 1
            'name = "a"',  # 2
            "extra_args = [",  # 3
            '  "x = 1",',  # 4
            "]",  # 5
            'doc = """',  # 6
            "port = 3",  # 7: inside a string, not a key
            '"""',  # 8
            "[[llamacpp]]",  # 9
            "port = 2",  # 10
            "[llamacpp.env]",  # 11
            "A = '1'",  # 12
            "[balancer]",  # 13
            "tls.cert = 'x'",  # 14
        ]
    )
    lines = locate_keys(text)
    assert lines["llamacpp[0]"] == 1
    assert lines["llamacpp[0].extra_args"] == 3
    assert "llamacpp[0].port" not in lines
    assert lines["llamacpp[1].port"] == 10
    assert lines["llamacpp[1].env.A"] == 12
    assert lines["balancer.tls.cert"] == 14


def test_worker_count_is_bounded_by_the_slot_tables_owner_entries(tmp_path: Path) -> None:
    assert problems("[balancer]\nworkers = 121\n", tmp_path) == [
        "f:2: balancer.workers: must be at most 120, not 121"
    ]


def test_the_balancers_two_ports_must_differ_even_on_different_addresses(
    tmp_path: Path,
) -> None:
    text = (
        '[balancer]\nmanagement_host = "127.0.0.1"\nmanagement_port = 9000\n'
        'reverseproxy_host = "127.0.0.2"\nreverseproxy_port = 9000\n'
    )
    assert problems(text, tmp_path) == [
        "f:5: balancer.reverseproxy_port: must differ from management_port"
    ]
