"""Compile the balancer's hot path with mypyc, beside the sources it came from.

    python packaging/compile_hot_path.py             # in place, for this checkout (make setup)
    python packaging/compile_hot_path.py --into DIR  # and into DIR/paddler/ (the packages)
    python packaging/compile_hot_path.py --optional  # no compiler or headers: say so, exit 0

Why: a proxied request costs Python some 200 calls in the slot table, the policy, the
upstream client and the metrics; no one of them stands out (docs/performance.md). mypyc,
which comes with mypy (already the project's type checker, so no new dependency), turns
these type-checked modules into C extensions that execute about a third fewer
instructions per request. Nothing else changes: the same sources, checked by the same
mypy, and every other module stays Python.

Each run writes paddler/_compiled.json last: the SHA-256 of every compiled module's
source. paddler/__init__.py compares them at import, and if any source has changed
since (an edit, a checkout), every compiled module is imported from its source instead,
so a stale extension never runs in place of the code beside it. A run with nothing
changed compiles nothing.

Needs a C compiler and the Python headers (Debian: gcc, python3-dev).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGE = REPOSITORY / "paddler"
MANIFEST = "_compiled.json"
# The shared library that holds every compiled module's code (each module's own
# extension is a small shim that imports it), named inside the package so that the
# package's finder (an editable install's too) finds it.
GROUP = "paddler._compiled"
# What a proxied request runs through, from its first byte to its last. Modules that
# run once per process, per report or per scrape gain nothing worth a build step.
MODULES = (
    "paddler/slots/table.py",
    "paddler/slots/policy.py",
    "paddler/balancer/proxy/http.py",
    "paddler/balancer/proxy/connections.py",
    "paddler/balancer/proxy/upstream.py",
    "paddler/balancer/proxy/handler.py",
    "paddler/balancer/proxy/affinity.py",
    "paddler/balancer/proxy/routing.py",
    "paddler/balancer/proxy/waiting.py",
    "paddler/prefixes/index.py",
    "paddler/prefixes/keys.py",
    "paddler/prefixes/slots.py",
    "paddler/metrics/recorder.py",
    "paddler/metrics/counters.py",
)


class CompileError(Exception):
    """The compiler could not run or failed; the message says why."""


def digests() -> dict[str, str]:
    """Each compiled module's name and the SHA-256 of its source."""
    return {
        path.removesuffix(".py").replace("/", "."): hashlib.sha256(
            (REPOSITORY / path).read_bytes()
        ).hexdigest()
        for path in MODULES
    }


def extensions(directory: Path) -> list[Path]:
    """The compiled files under ``directory``'s paddler/, of any Python version."""
    package = directory / "paddler"
    return sorted(package.rglob("*.so")) if package.is_dir() else []


def up_to_date(directory: Path, wanted: dict[str, str]) -> bool:
    manifest = directory / "paddler" / MANIFEST
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    present = all((directory / (name.replace(".", "/") + suffix)).exists() for name in wanted)
    return bool(recorded.get("modules") == wanted and present)


def check_toolchain() -> None:
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        raise CompileError(f"no Python headers ({headers} is missing; Debian: python3-dev)")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        raise CompileError(f"no C compiler ({compiler} is not on PATH; Debian: gcc)")
    try:
        # Imported here, not at the top: without it --optional says so and goes on.
        import mypyc.build  # noqa: F401, PLC0415 - comes with mypy, a dev dependency
    except ImportError as error:
        raise CompileError(f"mypyc is not installed ({error}; it comes with mypy)") from error


def build(work: Path) -> None:
    """Compile MODULES into the source tree (build_ext --inplace)."""
    from mypyc.build import mypycify  # noqa: PLC0415 - see check_toolchain()
    from setuptools import Distribution  # noqa: PLC0415

    os.chdir(REPOSITORY)  # mypy reads its configuration from pyproject.toml here
    modules = mypycify(
        list(MODULES),
        opt_level="3",
        multi_file=True,  # a C file per module: both cores compile, and an edit recompiles one
        group_name=GROUP,
        target_dir=str(work / "c"),
    )
    for module in modules:
        # mypyc writes a dotted group's headers under the group's package directory,
        # and its multi-file C sources include them by bare name.
        module.include_dirs.append(str(work / "c" / "paddler"))
    distribution = Distribution({"name": "paddler-compiled", "ext_modules": modules})
    command = distribution.get_command_obj("build_ext")
    command.inplace = True
    command.build_temp = str(work / "objects")
    command.parallel = os.cpu_count() or 1
    distribution.run_command("build_ext")


def compile_hot_path(into: Path | None) -> str:
    """Compile if any source changed; copy the result into ``into``. What was done."""
    wanted = digests()
    done = "the compiled hot path is up to date"
    if not up_to_date(REPOSITORY, wanted):
        check_toolchain()
        manifest = PACKAGE / MANIFEST
        manifest.unlink(missing_ok=True)  # until the new extensions are all in place
        for stale in extensions(REPOSITORY):
            stale.unlink()
        try:
            build(REPOSITORY / "build" / "mypyc")
        except (Exception, SystemExit) as error:  # distutils' errors, and mypy's exit
            raise CompileError(f"the build failed: {error!r} (its output is above)") from error
        manifest.write_text(json.dumps({"modules": wanted}, indent=1, sort_keys=True) + "\n")
        done = f"compiled {len(wanted)} modules with mypyc"
    if into is not None:
        for built in [*extensions(REPOSITORY), PACKAGE / MANIFEST]:
            target = into / built.relative_to(REPOSITORY)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, target)
        done += f"; copied into {into}"
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--into", type=Path, help="copy the compiled package files here too")
    parser.add_argument(
        "--optional", action="store_true", help="without a compiler, run pure Python: exit 0"
    )
    args = parser.parse_args(argv)
    try:
        print(compile_hot_path(args.into))
    except CompileError as error:
        if not args.optional:
            print(f"compile_hot_path.py: cannot compile the hot path: {error}", file=sys.stderr)
            return 1
        print(f"the hot path stays pure Python: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
