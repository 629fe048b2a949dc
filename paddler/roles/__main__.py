"""Entry point of the agent and balancer children that paddlerd forks.

paddlerd passes the role's validated settings as JSON, so that a child runs
exactly the configuration paddlerd checked, even if the file changed since.

Until the agent and balancer are built (issues 3 and 4), a role process only
holds its place under supervision: it logs what it would serve and waits for
SIGTERM.
"""

import json
import logging
import signal
import sys

log = logging.getLogger("paddler")

ROLES = ("agent", "balancer")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ROLES:
        print(
            f"usage: python -m paddler.roles {{{','.join(ROLES)}}} SETTINGS_JSON", file=sys.stderr
        )
        return 64
    role, raw = argv
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as error:
        print(f"paddler {role}: settings are not valid JSON: {error}", file=sys.stderr)
        return 78
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    log.warning(
        "%s role: not implemented yet in this version; holding its place under "
        "paddlerd (settings %s)",
        role,
        json.dumps(settings, sort_keys=True),
    )
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    received = signal.sigwait(stop)
    log.info("%s role: %s, stopping", role, signal.Signals(received).name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
