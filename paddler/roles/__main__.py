"""Entry point of the agent and balancer children that paddlerd forks.

paddlerd passes the role's validated settings as JSON, so that a child runs
exactly the configuration paddlerd checked, even if the file changed since.
"""

import json
import logging
import sys

from paddler.roles.run import ROLES, run_role


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
    # paddlerd prefixes every line with the time and the child's name.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    return run_role(role, settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
