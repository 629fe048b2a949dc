import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on now (the kernel's pick, so parallel runs do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
