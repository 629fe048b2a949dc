"""A non-blocking HTTP health probe that paddlerd's event loop drives.

paddlerd is single-threaded (it forks, and threads and fork do not mix), so a
probe must never block it: a llama-server that accepts but never answers would
otherwise stall signal handling for everyone.
"""

import errno
import selectors
import socket

from paddler.supervisor.specs import HealthCheck


class HealthProbe:
    def __init__(self, check: HealthCheck, deadline: float) -> None:
        self.deadline = deadline
        self._request = (
            f"GET {check.path} HTTP/1.1\r\nHost: {_host_header(check.host)}:{check.port}\r\n"
            "Connection: close\r\nUser-Agent: paddlerd\r\n\r\n"
        ).encode()
        self._response = b""
        self._sent = False
        family = socket.AF_INET6 if ":" in check.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        try:
            code = self.sock.connect_ex((check.host, check.port))
        except OSError:  # a host name that does not resolve
            code = errno.EHOSTUNREACH
        self.failed = code not in (0, errno.EINPROGRESS)

    @property
    def events(self) -> int:
        return selectors.EVENT_READ if self._sent else selectors.EVENT_WRITE

    def step(self) -> bool | None:
        """Advance on readiness: True for a 200, False for anything else, None for not yet."""
        try:
            if not self._sent:
                if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    return False
                self.sock.sendall(self._request)
                self._sent = True
                return None
            chunk = self.sock.recv(4096)
        except OSError:
            return False
        self._response += chunk
        if b"\r\n" in self._response:
            status_line = self._response.split(b"\r\n", 1)[0].split()
            return len(status_line) >= 2 and status_line[1] == b"200"
        return False if not chunk else None

    def close(self) -> None:
        self.sock.close()


def _host_header(host: str) -> str:
    return f"[{host}]" if ":" in host else host
