"""How many tokens of idle slots' prompts llama.cpp's host-memory prompt cache keeps: what
the agent, beside its llama-server, can tell and the balancer cannot.

llama.cpp saves the prompt of every idle slot to its host cache as a task starts
(--cache-idle-slots, on by default with a host cache), and drops the oldest saves once
the cache passes --cache-ram MiB (8192 by default; -1 no limit; 0 no cache). The
balancer counts those saves as spare copies of a prompt prefix (paddler/prefixes/
index.py) only while the saves made since one would still leave room for it, which
takes the cache's size in tokens: --cache-ram's bytes over what the model's KV cache
takes per token.

Nothing llama-server answers over HTTP says either, so the agent reads them where
llama-server was given them: the command line and environment of the process that
listens on its port (psutil; a llama-server another user runs is out of sight, and
reported as unknown), and the model's GGUF header (the path /props gives). The bytes
per token are a standard attention model's: per layer, K and V of head_count_kv heads
of key_length and value_length, at the cache types' sizes. Models whose KV cache is
shaped otherwise (sliding windows, recurrent state, latent attention) make this an
estimate, which the balancer's host trust still checks against what requests find.
"""

import ipaddress
import socket
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

import psutil

from paddler.slots.layout import UNLIMITED_HOST_CACHE

DEFAULT_CACHE_RAM_MIB: Final = 8192
UNLIMITED: Final = UNLIMITED_HOST_CACHE  # --cache-ram -1
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


def host_cache_tokens(host: str, port: int, model_path: str) -> int:
    """Tokens of idle slots' prompts that the host cache of the llama-server at ``host``
    (this host: a loopback address or one of its own) and ``port`` keeps (0: it keeps
    none; UNLIMITED: no limit). Raises HostCacheError when that cannot be told."""
    if not is_this_host(host):
        raise HostCacheError(f"{host} is not this host")
    argv, environ = _server_process(port)
    settings = cache_settings(argv, environ)
    if settings.cache_ram_mib == 0 or not settings.idle_slots:
        return 0
    if settings.cache_ram_mib < 0:
        return UNLIMITED
    path = settings.model or model_path
    if not path:
        raise HostCacheError("llama-server names no model file")
    per_token = kv_bytes_per_token(Path(path), settings.cache_type_k, settings.cache_type_v)
    return min(UNLIMITED - 1, int(settings.cache_ram_mib * 1024 * 1024 // per_token))


class CacheSettings:
    __slots__ = ("cache_ram_mib", "cache_type_k", "cache_type_v", "idle_slots", "model")

    def __init__(
        self, cache_ram_mib: int, cache_type_k: str, cache_type_v: str, idle_slots: bool, model: str
    ) -> None:
        self.cache_ram_mib = cache_ram_mib
        self.cache_type_k = cache_type_k
        self.cache_type_v = cache_type_v
        self.idle_slots = idle_slots
        self.model = model


def cache_settings(argv: Sequence[str], environ: Mapping[str, str]) -> CacheSettings:
    """llama-server's host cache settings from its arguments, else its environment
    (LLAMA_ARG_*), else its defaults; the last of a repeated argument wins, as in
    llama.cpp."""
    values = {
        "ram": environ.get("LLAMA_ARG_CACHE_RAM", str(DEFAULT_CACHE_RAM_MIB)),
        "k": environ.get("LLAMA_ARG_CACHE_TYPE_K", "f16"),
        "v": environ.get("LLAMA_ARG_CACHE_TYPE_V", "f16"),
        "model": environ.get("LLAMA_ARG_MODEL", ""),
    }
    idle = environ.get("LLAMA_ARG_CACHE_IDLE_SLOTS", "1").lower() not in ("0", "false", "off")
    names = {
        "-cram": "ram",
        "--cache-ram": "ram",
        "-ctk": "k",
        "--cache-type-k": "k",
        "-ctv": "v",
        "--cache-type-v": "v",
        "-m": "model",
        "--model": "model",
    }
    arguments = list(argv[1:])
    for at, argument in enumerate(arguments):
        name, equals, inline = argument.partition("=")
        if argument == "--cache-idle-slots":
            idle = True
        elif argument == "--no-cache-idle-slots":
            idle = False
        elif name in names:
            if equals:
                values[names[name]] = inline
            elif at + 1 < len(arguments):
                values[names[name]] = arguments[at + 1]
    try:
        cache_ram = int(values["ram"])
    except ValueError:
        raise HostCacheError(f"--cache-ram {values['ram']!r} is not a number") from None
    for kind in ("k", "v"):
        if values[kind] not in CACHE_TYPE_BYTES:
            raise HostCacheError(f"unknown KV cache type {values[kind]!r}")
    return CacheSettings(cache_ram, values["k"], values["v"], idle, values["model"])


def is_this_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this host: loopback, or an address
    of one of its interfaces."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    own = {
        address.address.split("%")[0]
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
    }
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        parsed = ipaddress.ip_address(address)
        if address in own or parsed.is_loopback or parsed.is_unspecified:
            return True
    return False


def _server_process(port: int) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the process listening on TCP ``port``."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if (
                connection.status == psutil.CONN_LISTEN
                and connection.laddr
                and connection.laddr.port == port
                and connection.pid
            ):
                process = psutil.Process(connection.pid)
                return process.cmdline(), process.environ()
    except psutil.Error as error:
        raise HostCacheError(f"cannot look at the process on port {port}: {error}") from None
    raise HostCacheError(f"no process of this user listens on port {port} here")


def kv_bytes_per_token(path: Path, type_k: str, type_v: str) -> float:
    """Bytes of KV cache per token of the model in the GGUF file at ``path``."""
    try:
        with path.open("rb") as file:
            metadata = _read_metadata(file)
    except OSError as error:
        raise HostCacheError(f"cannot read the model {path}: {error.strerror}") from None
    except (struct.error, UnicodeDecodeError):
        raise HostCacheError(f"the model {path} is no GGUF file this agent reads") from None
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise HostCacheError(f"the model {path} names no architecture")

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if not isinstance(value, int) or value <= 0:
            raise HostCacheError(f"the model {path} has no {arch}.{key}")
        return value

    layers = number("block_count")
    heads = number("attention.head_count")
    head_dim = number("embedding_length") // heads
    key_length = number("attention.key_length", head_dim)
    value_length = number("attention.value_length", head_dim)
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # one per layer (0: a layer without attention)
        per_layer = [int(count) for count in kv_heads[:layers]]
    elif isinstance(kv_heads, int):
        per_layer = [kv_heads] * layers
    else:
        raise HostCacheError(f"the model {path} has no {arch}.attention.head_count_kv")
    elements_k = sum(per_layer) * key_length
    elements_v = sum(per_layer) * value_length
    per_token = elements_k * CACHE_TYPE_BYTES[type_k] + elements_v * CACHE_TYPE_BYTES[type_v]
    if per_token <= 0:
        raise HostCacheError(f"the model {path} has no attention layers")
    return per_token


MetadataValue = int | float | bool | str | list[int | float | bool | str]


def _read_metadata(file: BinaryIO) -> dict[str, MetadataValue]:
    """The key-value metadata of a GGUF file (version 2 or 3), arrays of strings left out
    (the vocabulary: large, and of no use here)."""
    magic, version = struct.unpack("<4sI", file.read(8))
    if magic != GGUF_MAGIC or version not in (2, 3):
        raise struct.error("not GGUF")
    _, count = struct.unpack("<QQ", file.read(16))
    metadata: dict[str, MetadataValue] = {}
    for _ in range(count):
        key = _read_string(file)
        (kind,) = struct.unpack("<I", file.read(4))
        if kind == _ARRAY:
            element, length = struct.unpack("<IQ", file.read(12))
            if element == _STRING:
                for _ in range(length):
                    _read_string(file)
                continue
            fmt = _SCALARS.get(element)
            if fmt is None:
                raise struct.error(f"array of type {element}")
            size = struct.calcsize(fmt)
            data = file.read(size * length)
            metadata[key] = [value for (value,) in struct.iter_unpack(fmt, data)]
        elif kind == _STRING:
            metadata[key] = _read_string(file)
        else:
            fmt = _SCALARS.get(kind)
            if fmt is None:
                raise struct.error(f"value of type {kind}")
            (metadata[key],) = struct.unpack(fmt, file.read(struct.calcsize(fmt)))
    return metadata


def _read_string(file: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", file.read(8))
    raw = file.read(length)
    if len(raw) != length:
        raise struct.error("truncated")
    return raw.decode("utf-8")


def describe(tokens: int) -> str:
    return "no limit" if tokens == UNLIMITED else f"{tokens:,} tokens"
