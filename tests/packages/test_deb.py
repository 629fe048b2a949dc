"""The .deb in a clean Debian 12 root: install, run from its own files, keep and purge."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.packages.conftest import Packages
from tests.packages.debian_root import chroot, id_in_root

pytestmark = pytest.mark.packages

CONFIG = "etc/paddler/paddler.toml"


def test_installed_paddlerd_checks_the_shipped_configuration(installed_root: Path) -> None:
    root = installed_root
    check = chroot(root, "paddlerd", "--check-config", "/etc/paddler/paddler.toml")
    assert "/etc/paddler/paddler.toml: valid (1 balancer" in check.stdout

    # It ran from the package's own environment, on Debian's Python.
    assert chroot(root, "dpkg", "-S", "/usr/bin/paddlerd").stdout.strip() == (
        "paddler: /usr/bin/paddlerd"
    )
    assert os.readlink(root / "usr/bin/paddlerd") == "/opt/paddler/bin/paddlerd"
    assert os.readlink(root / "opt/paddler/bin/python3.11") == "/usr/bin/python3.11"
    shebang = (root / "opt/paddler/bin/paddlerd").read_text().splitlines()[0]
    assert shebang == "#!/opt/paddler/bin/python"
    # The balancer's hot path, compiled by the build (packaging/compile_hot_path.py),
    # loads on Debian's own Python.
    hot_path = chroot(
        root, "/opt/paddler/bin/python", "-c", "import paddler; print(paddler.HOT_PATH)"
    )
    assert hot_path.stdout.strip() == "compiled with mypyc"

    # The system user, and a configuration that only it (and root) can read: it holds
    # the management token.
    passwd = next(
        line
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith("paddler:")
    )
    assert passwd.endswith(":/var/lib/paddler:/usr/sbin/nologin")
    assert int(passwd.split(":")[2]) < 1000  # a system account
    config = (root / CONFIG).stat()
    assert config.st_mode & 0o777 == 0o640
    assert (config.st_uid, config.st_gid) == (0, id_in_root(root, "paddler", "group"))
    conffiles = chroot(root, "dpkg-query", "-W", "-f=${Conffiles}", "paddler").stdout
    assert "/etc/paddler/paddler.toml" in conffiles


def test_installed_paddlerd_names_the_bad_key_and_its_line(installed_root: Path) -> None:
    config = installed_root / CONFIG
    lines = config.read_text().splitlines()
    at = lines.index("reverseproxy_port = 8080")
    lines[at] = 'reverseproxy_port = "eighty"'
    config.write_text("\n".join(lines) + "\n")

    check = chroot(
        installed_root, "paddlerd", "--check-config", "/etc/paddler/paddler.toml", check=False
    )
    assert check.returncode == 78
    assert (
        f"/etc/paddler/paddler.toml:{at + 1}: balancer.reverseproxy_port: must be an integer"
        in check.stderr
    )
    assert "Traceback" not in check.stdout + check.stderr


def test_configuration_survives_upgrade_and_remove_and_purge_takes_it(
    installed_root: Path, packages: Packages
) -> None:
    root = installed_root
    config = root / CONFIG
    config.write_text(config.read_text() + "# edited by the operator\n")

    # Installing over itself runs the upgrade path of dpkg and the maintainer scripts.
    chroot(root, "dpkg", "-i", f"/tmp/{packages.deb.name}")
    assert config.read_text().endswith("# edited by the operator\n")
    assert not list((root / "etc/paddler").glob("paddler.toml.dpkg-*"))

    chroot(root, "dpkg", "-r", "paddler")
    assert config.read_text().endswith("# edited by the operator\n")
    status = chroot(root, "dpkg-query", "-W", "-f=${Status}", "paddler").stdout
    assert status == "deinstall ok config-files"
    assert not (root / "usr/bin/paddlerd").exists()
    assert not (root / "opt/paddler").exists()  # nothing written beside the packaged files

    chroot(root, "dpkg", "-P", "paddler")
    assert not (root / "etc/paddler").exists()
    assert chroot(root, "dpkg-query", "-W", "paddler", check=False).returncode != 0


def test_removing_a_never_configured_copy_leaves_the_root_as_it_was(
    debian_root: Path, packages: Packages
) -> None:
    before = {str(path.relative_to(debian_root)) for path in debian_root.rglob("*")}
    shutil.copy2(packages.deb, debian_root / "tmp" / packages.deb.name)
    chroot(debian_root, "dpkg", "-i", f"/tmp/{packages.deb.name}")
    chroot(debian_root, "dpkg", "-P", "paddler")
    (debian_root / "tmp" / packages.deb.name).unlink()
    after = {str(path.relative_to(debian_root)) for path in debian_root.rglob("*")}
    # dpkg's records and the kept system user remain; nothing of Paddler's does.
    records = re.compile(r"var/.*|etc/(passwd|group|shadow|gshadow)-")
    leftovers = {path for path in after - before if not records.fullmatch(path)}
    assert leftovers == set()
