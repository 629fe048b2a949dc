import socket

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on now (the kernel's pick, so parallel runs do not clash).

    Never the same one twice in a process: the kernel may pick a port again once the
    probe closes, and two listeners of one test given one port is a false failure."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
