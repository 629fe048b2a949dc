import ipaddress
import re

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_WILDCARDS = {"0.0.0.0", "::", ""}


def is_valid_host(host: str) -> bool:
    """An IPv4/IPv6 literal or an RFC 1123 host name."""
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
