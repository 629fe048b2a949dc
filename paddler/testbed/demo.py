"""The demo fleet: everything `make demo` starts, on this machine alone.

Builds llama-server once, writes a generated model, writes the demo configuration
next to it and hands over to paddlerd, which runs until Ctrl-C.
"""

import os
import socket
import sys
from importlib import resources

from paddler.testbed.llama_server import InstallError, cache_root, ensure_llama_server
from paddler.testbed.models import write_model

PORTS = (8080, 8081, 8082, 8085)


def busy_ports() -> list[int]:
    busy = []
    for port in PORTS:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


def main() -> int:
    taken = busy_ports()
    if taken:
        print(
            f"demo: ports {', '.join(map(str, taken))} are in use on 127.0.0.1; the demo "
            f"needs {', '.join(map(str, PORTS))}",
            file=sys.stderr,
        )
        return 1
    try:
        binary = ensure_llama_server()
    except InstallError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    state = cache_root() / "demo"
    model = state / "tiny-seed0.gguf"
    if not model.exists():
        write_model(model, "tiny", seed=0)
    template = resources.files("paddler.testbed").joinpath("demo.toml").read_text()
    config = state / "paddler.toml"
    config.write_text(template.format(state=state, binary=binary, model=model))
    print(f"demo: starting paddlerd with {config}; Ctrl-C stops it", file=sys.stderr)
    paddlerd = [sys.executable, "-m", "paddler.supervisor.cli", "-c", str(config)]
    os.execv(sys.executable, paddlerd)
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
