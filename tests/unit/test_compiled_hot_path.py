"""The compiled hot path (packaging/compile_hot_path.py) runs only while it matches its
sources: an edit or a missing extension puts every compiled module back on its source."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
COMPILED = REPOSITORY / "paddler" / "_compiled.json"

pytestmark = pytest.mark.skipif(
    not COMPILED.exists(), reason="the hot path is not compiled here (make setup compiles it)"
)

IMPORTS = """
import paddler, paddler.slots.policy as policy, paddler.slots.table as table
print(paddler.HOT_PATH)
print(policy.__file__)
print(table.__file__)
"""


def copy_of_the_package(into: Path) -> Path:
    shutil.copytree(
        REPOSITORY / "paddler", into / "paddler", ignore=shutil.ignore_patterns("__pycache__")
    )
    return into


def imported(root: Path) -> list[str]:
    """HOT_PATH and where policy and table came from, in a fresh interpreter whose
    first sys.path entry is ``root``."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS], cwd=root, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


def test_an_unchanged_copy_runs_compiled(tmp_path: Path) -> None:
    hot_path, policy, table = imported(copy_of_the_package(tmp_path))
    assert hot_path == "compiled with mypyc"
    assert policy.startswith(str(tmp_path))
    assert policy.endswith(".so")
    assert table.endswith(".so")


def test_an_edited_source_puts_every_compiled_module_back_on_its_source(
    tmp_path: Path,
) -> None:
    root = copy_of_the_package(tmp_path)
    with (root / "paddler/slots/policy.py").open("a") as source:
        source.write("\nEDITED = True\n")
    hot_path, policy, table = imported(root)
    assert hot_path.startswith("pure Python (paddler/slots/policy.py changed since")
    assert policy == str(root / "paddler/slots/policy.py")
    assert table == str(root / "paddler/slots/table.py")  # unchanged, but not mixed


def test_a_missing_extension_puts_every_compiled_module_back_on_its_source(
    tmp_path: Path,
) -> None:
    root = copy_of_the_package(tmp_path)
    (extension,) = (root / "paddler/slots").glob("table.*.so")
    extension.unlink()
    hot_path, policy, table = imported(root)
    assert "paddler.slots.table has no compiled copy" in hot_path
    assert policy.endswith("policy.py")
    assert table.endswith("table.py")


def test_extensions_no_build_vouches_for_are_not_run(tmp_path: Path) -> None:
    root = copy_of_the_package(tmp_path)
    (root / "paddler/_compiled.json").write_text("{not json")
    hot_path, policy, table = imported(root)
    assert "has a compiled copy no build vouches for" in hot_path
    assert policy.endswith("policy.py")
    assert table.endswith("table.py")
