"""A file that every balancer process maps: written whole before anyone can open it, and
opened by each process with a descriptor of its own (one inherited across a fork would
share its flock with the parent)."""

import mmap
import os
import struct
from pathlib import Path


def create_mapped(path: Path, size: int, header: bytes) -> None:
    """A new file of ``size`` bytes (zeros) beginning with ``header``, replacing any old
    one atomically: a reader finds a whole file or none."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, header, 0)
    finally:
        os.close(fd)
    partial.replace(path)


def open_mapped(
    path: Path,
    what: str,
    magic: bytes,
    version: int,
    header: struct.Struct,
    base: int,
    unit: int,
    error: type[Exception],
) -> tuple[int, mmap.mmap, int]:
    """The descriptor and mapping of ``path``, a ``what`` whose ``header`` (magic,
    version, count) says ``magic`` and ``version``, and the count it says: the file
    holds ``base`` bytes and count times ``unit`` more. Anything else raises ``error``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as failure:
        raise error(f"cannot open the {what} {path}: {failure}") from failure
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size)
    except (OSError, ValueError) as failure:
        os.close(fd)
        raise error(f"cannot map the {what} {path}: {failure}") from failure
    found, found_version, count = header.unpack_from(mapping, 0)
    if found != magic or found_version != version or len(mapping) < base + count * unit:
        mapping.close()
        os.close(fd)
        raise error(f"{path} is not a {what} of version {version}")
    return fd, mapping, count
