"""The ``paddler`` command: one role in the foreground, as the original Paddler ran.

    paddler agent --external-llamacpp-host H --external-llamacpp-port P
                  --local-llamacpp-host H --local-llamacpp-port P
                  --management-host H --management-port P
    paddler balancer --management-host H --management-port P
                     --reverseproxy-host H --reverseproxy-port P

Each builds the same settings that paddlerd would from a [[agent]] or [balancer]
table, validated by the same rules, and runs that one role.
"""

import argparse
import logging
import os
import sys
from typing import Any

from paddler.config import AgentSettings, BalancerSettings, ConfigError
from paddler.config.addresses import format_address
from paddler.config.loader import validate_section
from paddler.config.model import DEFAULT_MANAGEMENT_PORT
from paddler.roles.run import run_role

TOKEN_VARIABLE = "PADDLER_MANAGEMENT_TOKEN"  # noqa: S105 - the name of the variable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paddler",
        description="Run one Paddler role in the foreground. To run a whole host from "
        "/etc/paddler/paddler.toml, use paddlerd.",
    )
    roles = parser.add_subparsers(dest="role", metavar="{agent,balancer}", required=True)
    token_help = f"the management API's bearer token (default: ${TOKEN_VARIABLE})"

    agent = roles.add_parser("agent", help="watch a llama-server and report its slots")
    agent.add_argument("--local-llamacpp-host", default="127.0.0.1")
    agent.add_argument("--local-llamacpp-port", type=int, required=True)
    agent.add_argument("--local-llamacpp-api-key")
    agent.add_argument(
        "--external-llamacpp-host",
        help='as the balancer reaches it; "aws:metadata:local-ipv4" asks EC2',
    )
    agent.add_argument("--external-llamacpp-port", type=int)
    agent.add_argument("--management-host", default="127.0.0.1")
    agent.add_argument("--management-port", type=int, default=DEFAULT_MANAGEMENT_PORT)
    agent.add_argument("--management-token", help=token_help)
    agent.add_argument("--name")
    agent.add_argument("--monitoring-interval", type=float, default=1.0)
    agent.add_argument("--aws-metadata-url", default="http://169.254.169.254")

    balancer = roles.add_parser("balancer", help="the management API and the reverse proxy")
    balancer.add_argument("--management-host", default="127.0.0.1")
    balancer.add_argument("--management-port", type=int, default=DEFAULT_MANAGEMENT_PORT)
    balancer.add_argument("--management-token", help=token_help)
    balancer.add_argument("--reverseproxy-host", default="127.0.0.1")
    balancer.add_argument("--reverseproxy-port", type=int, default=8080)
    balancer.add_argument("--workers", type=int)
    balancer.add_argument(
        "--slot-table", help="default: /run/paddler/balancer-<management port>.slots"
    )
    balancer.add_argument(
        "--routing-policy",
        help="cache_aware (the default), least_busy (the original's), session or round_robin",
    )
    return parser


def _settings(args: argparse.Namespace) -> tuple[type[Any], dict[str, Any]]:
    values = {
        key: value for key, value in vars(args).items() if key != "role" and value is not None
    }
    token = values.get("management_token") or os.environ.get(TOKEN_VARIABLE)
    if token:
        values["management_token"] = token
    if args.role == "agent":
        host = values.pop("management_host")
        port = values.pop("management_port")
        values["balancers"] = [
            format_address(host, port) if 1 <= port <= 65535 else f"{host}:{port}"
        ]
        return AgentSettings, values
    return BalancerSettings, values


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cls, values = _settings(args)
    try:
        settings = validate_section(cls, values, "paddler " + args.role)
    except ConfigError as error:
        for problem in error.problems:
            flag = (
                "--management-host/--management-port"
                if problem.key == "balancers"
                else ("--" + problem.key.replace("_", "-"))
            )
            print(f"paddler {args.role}: {flag}: {problem.message}", file=sys.stderr)
        return 78
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    return run_role(args.role, vars(settings))


if __name__ == "__main__":
    sys.exit(main())
