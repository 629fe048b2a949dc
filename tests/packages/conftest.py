"""Fixtures for the package tests: the .deb and .rpm built once, a fresh Debian root each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.packages.debian_root import chroot, fresh_root, remove_root

REPOSITORY = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # chroot, dpkg into a root of our own and setpriv need root; `make test` runs as root
    # on CI. Elsewhere these tests say why they did not run rather than fail.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="package tests install into a chroot: run them as root")
    for item in items:
        if "packages" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    out = tmp_path_factory.mktemp("packages")
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "packaging/build.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (deb,) = out.glob("*.deb")
    (rpm,) = out.glob("*.rpm")
    return Packages(deb=deb, rpm=rpm)


@pytest.fixture
def debian_root(tmp_path: Path) -> Iterator[Path]:
    root = fresh_root(tmp_path)
    try:
        yield root
    finally:
        remove_root(root)


@pytest.fixture
def installed_root(debian_root: Path, packages: Packages) -> Path:
    """A Debian root with the .deb installed by dpkg."""
    shutil.copy2(packages.deb, debian_root / "tmp" / packages.deb.name)
    chroot(debian_root, "dpkg", "-i", f"/tmp/{packages.deb.name}")
    return debian_root
