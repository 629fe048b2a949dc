"""Build Paddler's .deb and .rpm from this repository.

    python packaging/build.py                  # both, into dist/
    python packaging/build.py --format deb     # one of them
    python packaging/build.py --python /usr/bin/python3.11 --out /tmp/pkgs

Both packages carry the same tree, staged once:

    /opt/paddler/                  a virtual environment with Paddler and every Python
                                   dependency (installing needs no network)
    /usr/bin/{paddlerd,paddlerctl,paddler} -> /opt/paddler/bin/...
    /etc/paddler/paddler.toml      the commented example; a configuration file kept across
                                   upgrades (dpkg conffile, rpm %config(noreplace))
    /usr/lib/systemd/system/paddlerd.service
    /usr/share/doc/paddler/        README, docs/, copyright

The environment runs on the target's own Python (--python, by default /usr/bin/python3),
so the packages depend on that exact minor version (python3.11 on Debian 12 and RHEL 9).
The balancer's hot path goes in compiled with mypyc (packaging/compile_hot_path.py) when
the target's Python is this build's minor version, which the packages depend on anyway.
The build needs pip (for PyPI, or its cache), a C compiler and the Python headers,
dpkg-deb for the .deb and rpmbuild for the .rpm (Debian's package `rpm`); it installs
nothing on the build host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from compile_hot_path import CompileError, compile_hot_path

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGING = REPOSITORY / "packaging"
PREFIX = "/opt/paddler"
COMMANDS = ("paddlerd", "paddlerctl", "paddler")
UNIT = "/usr/lib/systemd/system/paddlerd.service"
CONFIG = "/etc/paddler/paddler.toml"
DOCS = "/usr/share/doc/paddler"
RELEASE = "1"


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


def run(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise BuildError(
            f"{' '.join(argv[:3])} ... failed (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-4000:]}"
        )


def project_metadata() -> dict[str, str]:
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    return {
        "version": project["version"],
        "description": project["description"],
        "license": project["license"]["text"],
    }


def python_version(python: str) -> str:
    """'3.11' for the interpreter the packaged environment will run on."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        raise BuildError(f"--python {python}: cannot run it ({error})") from error
    if tuple(int(part) for part in out.split(".")) < (3, 11):
        raise BuildError(f"--python {python} is Python {out}; Paddler needs 3.11 or newer")
    return out


def stage(root: Path, python: str, work: Path) -> None:
    """Lay out the installed tree under root, as it will be on the target."""
    wheels = work / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), "."],
        cwd=REPOSITORY,
    )
    (wheel,) = wheels.glob("paddler-*.whl")

    venv = root / PREFIX.lstrip("/")
    run([python, "-m", "venv", "--without-pip", str(venv)])
    # pip runs under the venv's interpreter, so it picks wheels for the target's Python.
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-compile",
            "--no-warn-script-location",
            str(wheel),
        ]
    )
    ship_compiled(venv, python)
    relocate(venv, root)
    # Byte-code compiled now, under the paths it will have, so that the read-only /opt of
    # the hardened unit never needs a write and tracebacks name the installed files.
    run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "-s",
            str(root),
            str(venv / "lib"),
        ]
    )

    for command in COMMANDS:
        link = root / "usr/bin" / command
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"{PREFIX}/bin/{command}")

    config = root / CONFIG.lstrip("/")
    config.parent.mkdir(parents=True)
    shutil.copy2(REPOSITORY / "etc/paddler/paddler.toml", config)

    unit = root / UNIT.lstrip("/")
    unit.parent.mkdir(parents=True)
    shutil.copy2(REPOSITORY / "systemd/paddlerd.service", unit)

    docs = root / DOCS.lstrip("/")
    docs.mkdir(parents=True)
    shutil.copy2(REPOSITORY / "README.md", docs / "README.md")
    shutil.copytree(REPOSITORY / "docs", docs / "docs")
    meta = project_metadata()
    (docs / "copyright").write_text(
        "Paddler: slot-aware load balancer for llama.cpp fleets\n"
        f"License: {meta['license']}\n\n"
        "The Python packages under /opt/paddler/lib carry their own licenses in their\n"
        "*.dist-info directories.\n"
    )


def ship_compiled(venv: Path, python: str) -> None:
    """The hot path compiled with mypyc (packaging/compile_hot_path.py), when the target's
    Python is the one this build compiles for; else its pure-Python modules, said so."""
    version = python_version(python)
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if version != ours:
        print(
            f"build.py: the hot path ships as pure Python: the build's Python is {ours}, "
            f"the target's {version} (build with a {version} environment to compile it)",
            file=sys.stderr,
        )
        return
    try:
        compile_hot_path(venv / "lib" / f"python{version}" / "site-packages")
    except CompileError as error:
        raise BuildError(f"compiling the hot path: {error}") from error


def relocate(venv: Path, root: Path) -> None:
    """Rewrite the staging path out of the venv's scripts and pyvenv.cfg.

    pip writes the interpreter's absolute path into every script's #! line, and venv
    writes its own path into the activate scripts and pyvenv.cfg."""
    staged = str(root).encode()
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        content = path.read_bytes()
        if staged in content:
            path.write_bytes(content.replace(staged, b""))
    for direct_url in (venv / "lib").glob("python*/site-packages/*.dist-info/direct_url.json"):
        direct_url.unlink()  # names the build's scratch directory, not a source anyone has
    leaks = [
        str(path)
        for path in venv.rglob("*")
        if path.is_file() and not path.is_symlink() and staged in path.read_bytes()
    ]
    if leaks:
        raise BuildError(f"the staging path {root} is still written in: {', '.join(leaks[:5])}")


def installed_size_kib(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if not p.is_dir()) // 1024 + 1


def build_deb(root: Path, python: str, out: Path, work: Path) -> Path:
    meta = project_metadata()
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = work / "deb"
    shutil.copytree(root, tree, symlinks=True)
    control = tree / "DEBIAN"
    control.mkdir()
    (control / "control").write_text(
        f"Package: paddler\n"
        f"Version: {meta['version']}-{RELEASE}\n"
        f"Architecture: {arch}\n"
        f"Maintainer: Paddler developers <paddler@localhost>\n"
        f"Installed-Size: {installed_size_kib(root)}\n"
        f"Depends: python{python}, passwd\n"
        f"Section: net\n"
        f"Priority: optional\n"
        f"Description: {meta['description']}\n"
        " Paddler puts one endpoint in front of many llama.cpp servers and sends each\n"
        " request where a slot is free. paddlerd supervises the host's roles (balancer,\n"
        " agents, llama-servers) from /etc/paddler/paddler.toml.\n"
    )
    (control / "conffiles").write_text(CONFIG + "\n")
    for script in ("postinst", "prerm", "postrm"):
        target = control / script
        shutil.copy2(PACKAGING / "debian" / script, target)
        target.chmod(0o755)
    (tree / CONFIG.lstrip("/")).chmod(0o640)
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"paddler_{meta['version']}-{RELEASE}_{arch}.deb"
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(tree), str(deb)])
    return deb


def build_rpm(root: Path, python: str, out: Path, work: Path) -> Path:
    meta = project_metadata()
    arch = os.uname().machine
    files = []
    for path in sorted(root.rglob("*")):
        installed = "/" + str(path.relative_to(root))
        if installed == CONFIG:
            files.append(f"%config(noreplace) %attr(0640,root,paddler) {installed}")
        elif installed == "/etc/paddler":
            files.append(f"%dir %attr(0750,root,paddler) {installed}")
        elif path.is_dir() and not path.is_symlink():
            if installed.startswith((PREFIX, DOCS)):
                files.append(f"%dir {installed}")
        else:
            files.append(installed)
    template = (PACKAGING / "rpm" / "paddler.spec.in").read_text()
    spec = work / "paddler.spec"
    spec.write_text(
        template.replace("@VERSION@", meta["version"])
        .replace("@RELEASE@", RELEASE)
        .replace("@SUMMARY@", meta["description"])
        .replace("@LICENSE@", meta["license"])
        .replace("@PYTHON@", f"python{python}")
        .replace("@ARCH@", arch)
        .replace("@FILES@", "\n".join(files))
    )
    topdir = work / "rpmbuild"
    run(
        [
            "rpmbuild",
            "-bb",
            "--quiet",
            "--define",
            f"_topdir {topdir}",
            "--define",
            f"_stage {root}",
            "--target",
            arch,
            str(spec),
        ]
    )
    (built,) = (topdir / "RPMS" / arch).glob("paddler-*.rpm")
    out.mkdir(parents=True, exist_ok=True)
    rpm = out / built.name
    shutil.copy2(built, rpm)
    return rpm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=["deb", "rpm", "all"], default="all")
    parser.add_argument(
        "--python",
        default="/usr/bin/python3",
        help="the target's Python, which the packaged environment runs on",
    )
    parser.add_argument("--out", type=Path, default=REPOSITORY / "dist")
    args = parser.parse_args(argv)
    tools = {"deb": ["dpkg-deb"], "rpm": ["rpmbuild"], "all": ["dpkg-deb", "rpmbuild"]}
    missing = [tool for tool in tools[args.format] if shutil.which(tool) is None]
    if missing:
        print(
            f"build.py: {', '.join(missing)} not found (Debian: apt-get install dpkg-dev rpm)",
            file=sys.stderr,
        )
        return 1
    try:
        version = python_version(args.python)
        # The versioned binary: /usr/bin/python3 may be another minor version after a
        # distribution upgrade, which the environment's wheels would not fit.
        python = os.path.realpath(shutil.which(args.python) or args.python)
        with tempfile.TemporaryDirectory(prefix="paddler-package-") as scratch:
            work = Path(scratch)
            root = work / "root"
            stage(root, python, work)
            if args.format in ("deb", "all"):
                print(build_deb(root, version, args.out.resolve(), work))
            if args.format in ("rpm", "all"):
                print(build_rpm(root, version, args.out.resolve(), work))
    except BuildError as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
