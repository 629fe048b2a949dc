"""The .rpm: its file list, configuration file and scripts, and its payload at work."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.packages.conftest import Packages
from tests.packages.debian_root import chroot

pytestmark = pytest.mark.packages


def rpm_query(package: Path, *options: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", *options, str(package)], capture_output=True, text=True, check=True
    ).stdout


def test_rpm_carries_the_intended_files(packages: Packages) -> None:
    files = rpm_query(packages.rpm, "--list").split()
    for expected in (
        "/usr/bin/paddlerd",
        "/usr/bin/paddlerctl",
        "/usr/bin/paddler",
        "/etc/paddler/paddler.toml",
        "/usr/lib/systemd/system/paddlerd.service",
        "/opt/paddler/bin/python3.11",
        "/opt/paddler/pyvenv.cfg",
        "/usr/share/doc/paddler/README.md",
        "/usr/share/doc/paddler/docs/configuration.md",
    ):
        assert expected in files
    assert any(f.startswith("/opt/paddler/lib/python3.11/site-packages/uvloop/") for f in files)
    owned = ("/opt/paddler", "/usr/bin/paddler", "/etc/paddler", "/usr/share/doc/paddler")
    strays = [f for f in files if not f.startswith(owned) and not f.endswith("paddlerd.service")]
    assert strays == []  # no shared directories (/usr, /etc...) claimed by the package

    assert rpm_query(packages.rpm, "--configfiles").split() == ["/etc/paddler/paddler.toml"]
    modes = rpm_query(
        packages.rpm, "--queryformat", "[%{FILENAMES} %{FILEMODES:perms} %{FILEGROUPNAME}\n]"
    )
    assert "/etc/paddler/paddler.toml -rw-r----- paddler" in modes.splitlines()
    assert "/etc/paddler drwxr-x--- paddler" in modes.splitlines()

    requires = rpm_query(packages.rpm, "--requires").splitlines()
    assert "python3.11" in requires
    assert not [r for r in requires if r.startswith("lib")]  # the wheels bring their own


def test_rpm_scripts_create_the_user_and_stop_only_on_erase(packages: Packages) -> None:
    scripts = rpm_query(packages.rpm, "--scripts")
    pre = scripts.split("preinstall scriptlet")[1].split("scriptlet")[0]
    assert "useradd --system --gid paddler" in pre
    preun = scripts.split("preuninstall scriptlet")[1].split("scriptlet")[0]
    assert "if [ $1 -eq 0 ]" in preun
    assert "systemctl stop paddlerd.service" in preun
    postun = scripts.split("postuninstall scriptlet")[1]
    assert "try-restart paddlerd.service" in postun


def test_rpm_payload_unpacked_runs_the_check(packages: Packages, debian_root: Path) -> None:
    payload = subprocess.run(
        ["rpm2cpio", str(packages.rpm)], capture_output=True, check=True
    ).stdout
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames", "-D", str(debian_root)],
        input=payload,
        check=True,
    )
    check = chroot(debian_root, "/usr/bin/paddlerd", "--check-config", "/etc/paddler/paddler.toml")
    assert "/etc/paddler/paddler.toml: valid (1 balancer" in check.stdout
