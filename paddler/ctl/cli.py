"""The paddlerctl command."""

import argparse
import os
import signal
import sys
from pathlib import Path

from paddler.cli import TOKEN_VARIABLE
from paddler.config import DEFAULT_CONFIG_PATH, BalancerSettings, ConfigError, load_config
from paddler.config.model import slot_table_path
from paddler.ctl import agents, drain, status
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
    agents_parser = commands.add_parser("agents", help="list the upstreams the balancer knows")
    agents_parser.add_argument(
        "--management",
        metavar="URL",
        help="ask this management API instead of the local slot table",
    )
    agents_parser.add_argument("--token", help=f"its bearer token (default: ${TOKEN_VARIABLE})")
    agents_parser.add_argument("--table", type=Path, help="read this slot table file")
    agents_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    drain_parser = commands.add_parser(
        "drain", help="no new requests to an upstream while those in flight finish"
    )
    drain_parser.add_argument("upstream", help="its name, address (host:port) or agent id")
    drain_parser.add_argument("--undo", action="store_true", help="put it back in rotation")
    drain_parser.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=600.0,
        metavar="SECONDS",
        help="wait until no request is in flight on it (at most SECONDS, default 600)",
    )
    drain_parser.add_argument(
        "--management", metavar="URL", help="the balancer's management API (default: this host's)"
    )
    drain_parser.add_argument(
        "--token", help=f"its bearer token (default: the configuration's, or ${TOKEN_VARIABLE})"
    )
    status_parser = commands.add_parser("status", help="the fleet and this host, live")
    status_parser.add_argument("--once", action="store_true", help="print one frame and exit")
    status_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    status_parser.add_argument(
        "--management",
        metavar="URL",
        help="ask this management API instead of this host's slot table",
    )
    status_parser.add_argument("--token", help=f"its bearer token (default: ${TOKEN_VARIABLE})")
    args = parser.parse_args(argv)
    if args.command == "status":
        return show_status(args)
    if args.command == "config":
        return check(args.config)
    if args.command == "agents":
        return list_agents(args)
    if args.command == "drain":
        return drain_upstream(args)
    return reload(args.config)


def local_balancer(path: Path) -> BalancerSettings | int:
    """This host's balancer settings from the configuration, or the exit status that
    says why there are none (the error already printed)."""
    try:
        config = load_config(path, check_files=False)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return 78
    if config.balancer is None:
        print(
            f"paddlerctl: {path} runs no balancer on this host; use --management URL",
            file=sys.stderr,
        )
        return 1
    return config.balancer


def drain_upstream(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_VARIABLE)
    url = args.management
    if url is None:
        balancer = local_balancer(args.config)
        if isinstance(balancer, int):
            return balancer
        url = drain.local_management_url(balancer)
        token = token or balancer.management_token
    return drain.run(url, token, args.upstream, args.undo, args.wait)


def show_status(args: argparse.Namespace) -> int:
    if args.management:
        token = args.token or os.environ.get(TOKEN_VARIABLE)
        collector = status.Collector(None, args.management, token)
        return status.run(collector, once=args.once, as_json=args.json)
    try:
        config = load_config(args.config, check_files=False)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return 78
    return status.run(status.Collector(config), once=args.once, as_json=args.json)


def list_agents(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_VARIABLE)
    if args.management or args.table:
        return agents.run(None, args.table, args.management, token, args.json)
    balancer = local_balancer(args.config)
    if isinstance(balancer, int):
        return balancer
    return agents.run(balancer, Path(slot_table_path(balancer)), None, token, args.json)


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
