"""How many tokens of idle slots' prompts llama.cpp's host-memory prompt cache keeps: what
the agent, beside its llama-server, can tell and the balancer cannot.

llama.cpp saves the prompt of every idle slot to its host cache as a task starts
(--cache-idle-slots, on by default with a host cache), and drops the oldest saves once
the cache passes --cache-ram MiB (8192 by default; 0 no cache; -1 no size limit, and
then it keeps as many tokens as its context holds: --ctx-size, else the model's). The
balancer counts those saves as spare copies of a prompt prefix (paddler/prefixes/
index.py) only while the saves made since one would still leave room for it, which
takes the cache's size in tokens: --cache-ram's bytes over what the model's KV cache
takes per token.

Nothing llama-server answers over HTTP says either, so the agent reads them where
llama-server was given them: the command line and environment of the process that
listens on its port (psutil; a llama-server another user runs is out of sight, and
reported as unknown), and the model's GGUF header (the path its command line or /props
gives, from its working directory), read by a reader that believes no length before
checking it against the file. The bytes
per token are a standard attention model's: per layer, K and V of head_count_kv heads
of key_length and value_length, at the cache types' sizes. Models whose KV cache is
shaped otherwise (sliding windows, recurrent state, latent attention) make this an
estimate, which the balancer's host trust still checks against what requests find.
"""

import ipaddress
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

import psutil

from paddler.slots.layout import UNLIMITED_HOST_CACHE

DEFAULT_CACHE_RAM_MIB: Final = 8192
# Bytes per element of llama.cpp's KV cache types: block size over elements per block.
CACHE_TYPE_BYTES: Final = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}
GGUF_MAGIC: Final = b"GGUF"
# GGUF value types: the struct format of each fixed-size one.
_SCALARS: Final = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING: Final = 8
_ARRAY: Final = 9


class HostCacheError(Exception):
    """What made the host cache's size unknowable, said for the agent's log."""


# Bounds on what a GGUF header may claim before this reader believes it (a corrupt or
# hostile file must not make the agent allocate or loop for long).
MAX_METADATA_KEYS: Final = 100_000
MAX_LAYERS: Final = 100_000  # also the longest array of numbers read (longer: skipped)
MAX_STRINGS: Final = 10_000_000  # in an array (a vocabulary has a few hundred thousand)


def host_cache_tokens(host: str, port: int, model_path: str) -> int:
    """Tokens of idle slots' prompts that the host cache of the llama-server at ``host``
    (this host: a loopback address or one of its own) and ``port`` keeps (0: it keeps
    none). Raises HostCacheError when that cannot be told."""
    addresses = this_host_addresses(host)
    if not addresses:
        raise HostCacheError(f"{host} is not this host")
    argv, environ, cwd = _server_process(addresses, port)
    settings = cache_settings(argv, environ)
    if settings.cache_ram_mib == 0 or not settings.idle_slots:
        return 0
    path = Path(settings.model or model_path)
    if not str(path) or str(path) == ".":
        raise HostCacheError("llama-server names no model file")
    model = read_model(path if path.is_absolute() else Path(cwd) / path)
    if settings.cache_ram_mib < 0:
        # No size limit: llama.cpp still drops the oldest saves past its context's tokens.
        return min(UNLIMITED_HOST_CACHE - 1, settings.context or model.context)
    per_token = model.kv_bytes_per_token(settings.cache_type_k, settings.cache_type_v)
    return min(UNLIMITED_HOST_CACHE - 1, int(settings.cache_ram_mib * 1024 * 1024 // per_token))


class CacheSettings:
    __slots__ = (
        "cache_ram_mib",
        "cache_type_k",
        "cache_type_v",
        "context",
        "idle_slots",
        "model",
    )

    def __init__(
        self,
        cache_ram_mib: int,
        cache_type_k: str,
        cache_type_v: str,
        idle_slots: bool,
        model: str,
        context: int = 0,
    ) -> None:
        self.cache_ram_mib = cache_ram_mib
        self.cache_type_k = cache_type_k
        self.cache_type_v = cache_type_v
        self.idle_slots = idle_slots
        self.model = model
        self.context = context  # --ctx-size (0: the model's)


_FALSE: Final = ("0", "false", "off", "disabled")
_NAMES: Final = {
    "-cram": "ram",
    "--cache-ram": "ram",
    "-ctk": "k",
    "--cache-type-k": "k",
    "-ctv": "v",
    "--cache-type-v": "v",
    "-m": "model",
    "--model": "model",
    "-c": "context",
    "--ctx-size": "context",
}


def cache_settings(argv: Sequence[str], environ: Mapping[str, str]) -> CacheSettings:
    """llama-server's host cache settings from its arguments, else its environment
    (LLAMA_ARG_*), else its defaults; the last of a repeated argument wins, as in
    llama.cpp."""
    values = {
        "ram": environ.get("LLAMA_ARG_CACHE_RAM", str(DEFAULT_CACHE_RAM_MIB)),
        "k": environ.get("LLAMA_ARG_CACHE_TYPE_K", "f16"),
        "v": environ.get("LLAMA_ARG_CACHE_TYPE_V", "f16"),
        "model": environ.get("LLAMA_ARG_MODEL", ""),
        "context": environ.get("LLAMA_ARG_CTX_SIZE", "0"),
    }
    idle = environ.get("LLAMA_ARG_CACHE_IDLE_SLOTS", "1").lower() not in _FALSE
    arguments = list(argv[1:])
    for at, argument in enumerate(arguments):
        name, equals, inline = argument.partition("=")
        if argument == "--cache-idle-slots":
            idle = True
        elif argument == "--no-cache-idle-slots":
            idle = False
        elif name in _NAMES:
            if equals:
                values[_NAMES[name]] = inline
            elif at + 1 < len(arguments):
                values[_NAMES[name]] = arguments[at + 1]
    numbers = {}
    for key, flag in (("ram", "--cache-ram"), ("context", "--ctx-size")):
        try:
            numbers[key] = int(values[key])
        except ValueError:
            raise HostCacheError(f"{flag} {values[key]!r} is not a number") from None
    for kind in ("k", "v"):
        if values[kind] not in CACHE_TYPE_BYTES:
            raise HostCacheError(f"unknown KV cache type {values[kind]!r}")
    return CacheSettings(
        numbers["ram"], values["k"], values["v"], idle, values["model"], max(0, numbers["context"])
    )


def this_host_addresses(host: str) -> set[str]:
    """The addresses ``host`` (a name or an address) has here, if it is this host
    (loopback, unspecified, or an address of one of its interfaces); else none."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        own = {
            address.address.split("%")[0]
            for addresses in psutil.net_if_addrs().values()
            for address in addresses
        }
    except (OSError, UnicodeError, psutil.Error):
        return set()
    found: set[str] = set()
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        parsed = ipaddress.ip_address(address)
        if address in own or parsed.is_loopback or parsed.is_unspecified:
            found.add(address)
    return found


def _server_process(addresses: set[str], port: int) -> tuple[list[str], dict[str, str], str]:
    """The command line, environment and working directory of the process listening on
    TCP ``port`` here: on one of ``addresses`` first, else on any (0.0.0.0, say)."""
    failure: psutil.Error | None = None
    try:
        listening: list[tuple[bool, int]] = []
        for connection in psutil.net_connections(kind="tcp"):
            local = connection.laddr
            if (
                connection.status == psutil.CONN_LISTEN
                and isinstance(local, tuple)
                and len(local) >= 2
                and local[1] == port
                and connection.pid
            ):
                listening.append((local[0] not in addresses, connection.pid))
    except psutil.Error as error:
        raise HostCacheError(f"cannot list the ports listened on here: {error}") from None
    for _, pid in sorted(listening):
        try:
            process = psutil.Process(pid)
            return process.cmdline(), process.environ(), process.cwd()
        except psutil.Error as error:
            failure = error  # gone meanwhile, or another user's: the next one, if any
    if failure is not None:
        raise HostCacheError(f"cannot look at the process on port {port}: {failure}")
    raise HostCacheError(f"no process of this user listens on port {port} here")


class ModelFacts:
    """What a model's GGUF header says of its KV cache."""

    __slots__ = ("context", "key_length", "kv_heads", "value_length")

    def __init__(self, kv_heads: int, key_length: int, value_length: int, context: int) -> None:
        self.kv_heads = kv_heads  # summed over the layers
        self.key_length = key_length
        self.value_length = value_length
        self.context = context  # the context it was trained for: llama.cpp's default

    def kv_bytes_per_token(self, type_k: str, type_v: str) -> float:
        return self.kv_heads * (
            self.key_length * CACHE_TYPE_BYTES[type_k]
            + self.value_length * CACHE_TYPE_BYTES[type_v]
        )


def kv_bytes_per_token(path: Path, type_k: str, type_v: str) -> float:
    """Bytes of KV cache per token of the model in the GGUF file at ``path``."""
    return read_model(path).kv_bytes_per_token(type_k, type_v)


def read_model(path: Path) -> ModelFacts:
    """The KV cache's shape of the model in the GGUF file at ``path``."""
    try:
        with path.open("rb") as file:
            metadata = _read_metadata(file, os.fstat(file.fileno()).st_size)
    except OSError as error:
        reason = error.strerror or str(error)
        raise HostCacheError(f"cannot read the model {path}: {reason}") from None
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError):
        raise HostCacheError(f"the model {path} is no GGUF file this agent reads") from None
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise HostCacheError(f"the model {path} names no architecture")

    def number(key: str, default: int | None = None, most: int = 1 << 32) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most:
            raise HostCacheError(f"the model {path} has no {arch}.{key}")
        return value

    layers = number("block_count", most=MAX_LAYERS)
    heads = number("attention.head_count")
    head_dim = number("embedding_length") // heads
    key_length = number("attention.key_length", head_dim)
    value_length = number("attention.value_length", head_dim)
    context = number("context_length", 4096)
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # one per layer (0: a layer without attention)
        if not all(isinstance(count, int) and count >= 0 for count in kv_heads):
            raise HostCacheError(f"the model {path} has no {arch}.attention.head_count_kv")
        total = sum(int(count) for count in kv_heads[:layers])
    elif isinstance(kv_heads, int) and kv_heads >= 0:
        total = kv_heads * layers
    else:
        raise HostCacheError(f"the model {path} has no {arch}.attention.head_count_kv")
    if total <= 0:
        raise HostCacheError(f"the model {path} has no attention layers")
    return ModelFacts(total, key_length, value_length, context)


MetadataValue = int | float | bool | str | list[int | float | bool | str]


def _read_metadata(file: BinaryIO, size: int) -> dict[str, MetadataValue]:
    """The key-value metadata of a GGUF file (version 2 or 3) ``size`` bytes long, arrays
    of strings left out (the vocabulary: large, and of no use here). Every length is
    checked against what is left of the file before it is read."""
    magic, version = struct.unpack("<4sI", _read(file, 8, size))
    if magic != GGUF_MAGIC or version not in (2, 3):
        raise struct.error("not GGUF")
    _, count = struct.unpack("<QQ", _read(file, 16, size))
    if count > MAX_METADATA_KEYS:
        raise struct.error("too many keys")
    metadata: dict[str, MetadataValue] = {}
    for _ in range(count):
        key = _read_string(file, size)
        (kind,) = struct.unpack("<I", _read(file, 4, size))
        if kind == _ARRAY:
            element, length = struct.unpack("<IQ", _read(file, 12, size))
            if element == _STRING:
                if length > MAX_STRINGS:
                    raise struct.error("too many strings")
                for _ in range(length):
                    (skipped,) = struct.unpack("<Q", _read(file, 8, size))
                    _seek(file, skipped, size)
                continue
            fmt = _SCALARS.get(element)
            if fmt is None:
                raise struct.error(f"array of type {element}")
            if length > MAX_LAYERS:
                _seek(file, struct.calcsize(fmt) * length, size)
                continue
            data = _read(file, struct.calcsize(fmt) * length, size)
            metadata[key] = [value for (value,) in struct.iter_unpack(fmt, data)]
        elif kind == _STRING:
            metadata[key] = _read_string(file, size)
        else:
            fmt = _SCALARS.get(kind)
            if fmt is None:
                raise struct.error(f"value of type {kind}")
            (metadata[key],) = struct.unpack(fmt, _read(file, struct.calcsize(fmt), size))
    return metadata


def _read(file: BinaryIO, length: int, size: int) -> bytes:
    if length > size - file.tell():
        raise struct.error("past the end of the file")
    return file.read(length)


def _seek(file: BinaryIO, length: int, size: int) -> None:
    if length > size - file.tell():
        raise struct.error("past the end of the file")
    file.seek(length, os.SEEK_CUR)


def _read_string(file: BinaryIO, size: int) -> str:
    (length,) = struct.unpack("<Q", _read(file, 8, size))
    return _read(file, length, size).decode("utf-8")
