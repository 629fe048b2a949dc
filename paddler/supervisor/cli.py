"""The paddlerd command."""

import argparse
import logging
import os
import sys
from pathlib import Path

from paddler import __version__
from paddler.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from paddler.supervisor.pidfile import AlreadyRunningError, Pidfile
from paddler.supervisor.published import state_path
from paddler.supervisor.sdnotify import Notifier
from paddler.supervisor.supervisor import Supervisor, apply_log_level

EX_OK = 0
EX_CONFIG = 78
EX_ALREADY_RUNNING = 75  # EX_TEMPFAIL: another paddlerd holds the pidfile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="paddlerd",
        description="Supervise this host's Paddler balancer, agents and llama-servers.",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--check-config",
        nargs="?",
        type=Path,
        const=True,
        default=None,
        metavar="PATH",
        help="validate the configuration and exit",
    )
    parser.add_argument("--pidfile", type=Path, help="override paddlerd.pidfile")
    parser.add_argument("--version", action="version", version=f"paddlerd {__version__}")
    return parser.parse_args(argv)


def describe(config: Config) -> str:
    parts = [f"{len(config.llamacpps)} llamacpp", f"{len(config.agents)} agent"]
    if config.balancer is not None:
        parts.insert(0, "1 balancer")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path: Path = args.config if args.check_config in (None, True) else args.check_config
    timestamps = "" if "JOURNAL_STREAM" in os.environ else "%(asctime)s "
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"{timestamps}[%(name)s] %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    try:
        config = load_config(path)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        print(f"paddlerd: {path} is not valid; nothing was started", file=sys.stderr)
        return EX_CONFIG
    if args.check_config is not None:
        print(f"{path}: valid ({describe(config)})")
        return EX_OK
    apply_log_level(config.paddlerd.log_level)
    pidfile = Pidfile(args.pidfile or Path(config.paddlerd.pidfile))
    try:
        pidfile.acquire()
    except AlreadyRunningError as error:
        print(f"paddlerd: {error}", file=sys.stderr)
        return EX_ALREADY_RUNNING
    except OSError as error:
        print(f"paddlerd: cannot write the pidfile {pidfile.path}: {error}", file=sys.stderr)
        return EX_CONFIG
    try:
        return Supervisor(
            path.resolve(), config, Notifier(), state_file=state_path(pidfile.path)
        ).run()
    finally:
        pidfile.release()


if __name__ == "__main__":
    sys.exit(main())
