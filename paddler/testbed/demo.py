"""The demo fleet: everything `make demo` starts, on this machine alone.

Builds llama-server once, writes a generated model, writes the demo configuration
next to it and hands over to paddlerd, which runs until Ctrl-C. Ports, from
--base-port (8080): the proxy, +1 and +2 the llama-servers, +5 the management API.
"""

import argparse
import os
import socket
import sys
from importlib import resources

from paddler.testbed.llama_server import InstallError, cache_root, ensure_llama_server
from paddler.testbed.models import write_model


def ports(base: int) -> dict[str, int]:
    return {"proxy": base, "llama_a": base + 1, "llama_b": base + 2, "management": base + 5}


def busy(candidates: list[int]) -> list[int]:
    taken = []
    for port in candidates:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(port)
    return taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the demo fleet on this machine.")
    parser.add_argument("--base-port", type=int, default=8080)
    args = parser.parse_args(argv)
    chosen = ports(args.base_port)
    taken = busy(list(chosen.values()))
    if taken:
        print(
            f"demo: ports {', '.join(map(str, taken))} are in use on 127.0.0.1; choose "
            "others with --base-port",
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
    config.write_text(template.format(state=state, binary=binary, model=model, **chosen))
    print(
        f"demo: starting paddlerd with {config}; Ctrl-C stops it\n"
        f'demo: the proxy is http://127.0.0.1:{chosen["proxy"]} (model "tiny"), the '
        f"management API http://127.0.0.1:{chosen['management']}",
        file=sys.stderr,
    )
    paddlerd = [sys.executable, "-m", "paddler.supervisor.cli", "-c", str(config)]
    os.execv(sys.executable, paddlerd)
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
