"""The ``paddler`` command: one role in the foreground, as the original Paddler ran."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paddler",
        description="Run one Paddler role in the foreground. To run a whole host from "
        "/etc/paddler/paddler.toml, use paddlerd.",
    )
    parser.add_subparsers(dest="role", metavar="{agent,balancer}")
    args = parser.parse_args(argv)
    if args.role is None:
        parser.print_help()
        return 64
    return 64


if __name__ == "__main__":
    sys.exit(main())
