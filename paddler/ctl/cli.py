"""The paddlerctl command."""

import argparse
import os
import signal
import sys
from pathlib import Path

from paddler.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from paddler.supervisor.pidfile import read_pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paddlerctl", description="Steer a Paddler host.")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    config_parser = commands.add_parser("config", help="work with the configuration file")
    config_commands = config_parser.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("check", help="validate the configuration file")
    commands.add_parser("reload", help="make paddlerd re-read its configuration (SIGHUP)")
    args = parser.parse_args(argv)
    if args.command == "config":
        return check(args.config)
    return reload(args.config)


def check(path: Path) -> int:
    try:
        load_config(path)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return 78
    print(f"{path}: valid")
    return 0


def reload(path: Path) -> int:
    try:
        config = load_config(path, check_files=False)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return 78
    pid = read_pid(Path(config.paddlerd.pidfile))
    if pid is None:
        print(f"paddlerctl: no paddlerd pid in {config.paddlerd.pidfile}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"paddlerctl: paddlerd (pid {pid}) is not running", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to paddlerd (pid {pid}); its log says what changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
