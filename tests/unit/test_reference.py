"""The documented configuration and the example file stay in step with the schema."""

import dataclasses
import re
from pathlib import Path

from paddler.config import parse_config
from paddler.config.model import SECTIONS
from paddler.config.reference import BEGIN, END, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "paddler" / "paddler.toml"


def test_docs_configuration_reference_matches_the_schema() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    embedded = docs[docs.index(BEGIN) : docs.index(END) + len(END)]
    assert embedded == render(), (
        "docs/configuration.md is out of date: replace its reference with the output of "
        "python -m paddler.config.reference"
    )


def uncommented_example() -> str:
    """The example with every commented-out setting ("#key =", "#[table]") switched on."""
    return re.sub(r"^#(?=\[|[a-z_]+ = )", "", EXAMPLE.read_text(), flags=re.MULTILINE)


def test_example_shows_every_key_and_is_valid_with_all_of_them_on(tmp_path: Path) -> None:
    text = uncommented_example()
    for section, (cls, is_array) in SECTIONS.items():
        header = f"[[{section}]]" if is_array else f"[{section}]"
        start = re.search(rf"^{re.escape(header)}$", text, flags=re.MULTILINE)
        assert start is not None, f"{header} is missing from the example"
        body = text[start.end() :].split("\n[", 1)[0]
        keys = set(re.findall(r"^([a-z_]+) = ", body, flags=re.MULTILINE))
        assert keys == {field.name for field in dataclasses.fields(cls)}, section
    config = parse_config(text, tmp_path / "paddler.toml", check_files=False)
    assert config.balancer is not None
    assert len(config.agents) == 1
    assert len(config.llamacpps) == 1
