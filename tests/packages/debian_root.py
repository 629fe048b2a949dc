"""A clean Debian 12 root of the tests' own, to install the .deb into.

debootstrap writes it once per machine from the mirror this host's apt already uses (the
tests name no host of their own) and it is cached as a tarball; each test unpacks a fresh
copy, so no test sees another's installation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from paddler.testbed.llama_server import cache_root

SUITE = "bookworm"
# What a real Debian 12 host running Paddler has beyond the minimal base: the Python the
# package depends on, systemd (its own systemd-analyze judges the unit), procps (the
# unit's ExecReload uses /bin/kill), and the libraries a CPU llama-server links.
INCLUDE = ("python3.11", "systemd", "procps", "libgomp1", "libssl3")
CACHE = cache_root() / "roots"


def debian_mirror() -> str:
    """The first Debian archive in this host's apt sources (PADDLER_DEBIAN_MIRROR wins)."""
    override = os.environ.get("PADDLER_DEBIAN_MIRROR")
    if override:
        return override
    sources = Path("/etc/apt/sources.list.d")
    texts = [path.read_text() for path in sorted(sources.glob("*.sources"))]
    texts += [path.read_text() for path in sorted(sources.glob("*.list"))]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        texts.append(legacy.read_text())
    for text in texts:
        for match in re.finditer(r"(?m)^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text):
            uri = match.group(1)
            if uri.rstrip("/").endswith("/debian"):
                return uri
    raise RuntimeError("no Debian archive in /etc/apt/sources.list{,.d}: set PADDLER_DEBIAN_MIRROR")


def pristine_archive() -> Path:
    archive = CACHE / f"debian-{SUITE}-{'-'.join(INCLUDE)}.tar"
    if archive.exists():
        return archive
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="paddler-debootstrap-") as scratch:
        root = Path(scratch) / "root"
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(INCLUDE)}",
                SUITE,
                str(root),
                debian_mirror(),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr}")
        partial = archive.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(archive)  # only a complete archive is ever found in the cache
    return archive


def fresh_root(directory: Path) -> Path:
    root = directory / "debian12"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(pristine_archive())], check=True)
    return root


def chroot(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside the root, as root, with a clean environment."""
    result = subprocess.run(
        ["chroot", str(root), *argv],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def id_in_root(root: Path, name: str, database: str = "passwd") -> int:
    """The uid (or with database="group", the gid) that ``name`` has inside the root:
    not the same as on the host."""
    for line in (root / "etc" / database).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no {name} in {root}/etc/{database}")


def remove_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
