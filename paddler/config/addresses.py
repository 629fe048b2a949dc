import functools
import ipaddress
import re

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_WILDCARDS = {"0.0.0.0", "::", ""}


@functools.lru_cache(maxsize=4096)
def is_valid_host(host: str) -> bool:
    """An IPv4/IPv6 literal or an RFC 1123 host name. Remembered: every agent's report
    names its host, a thousand times a second in a big fleet."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    if not host or len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    if labels[-1].isdigit():  # 300.1.1.1 is a bad address, not a host name
        return False
    return all(_LABEL.match(label) for label in labels)


def listeners_conflict(first: str, second: str) -> bool:
    """Whether two listeners on the same port would fight over it."""
    return first == second or first in _WILDCARDS or second in _WILDCARDS


AWS_LOCAL_IPV4 = "aws:metadata:local-ipv4"


def parse_address(address: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` as (host, port), or None when it is neither."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # a bare IPv6 address needs brackets before its port
    return (host, int(port)) if is_valid_host(host) else None


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
