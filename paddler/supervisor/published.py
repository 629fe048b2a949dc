"""paddlerd's children as paddlerctl sees them: a small JSON file beside the pidfile.

paddlerd rewrites it (atomically, by rename) whenever a child's state, pid or restart
count changes, and removes it when it stops. paddlerctl status reads it to show each
process's state and restarts; psutil gives the rest.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("paddlerd")


def state_path(pidfile: Path) -> Path:
    """/run/paddler/paddlerd.pid -> /run/paddler/paddlerd.state"""
    return pidfile.with_suffix(".state")


class Publisher:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._last: list[dict[str, Any]] | None = None
        self._failed = False

    def publish(self, children: list[dict[str, Any]]) -> None:
        if self.path is None or children == self._last:
            return
        self._last = children
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            partial.write_text(json.dumps({"pid": os.getpid(), "children": children}))
            partial.replace(self.path)
        except OSError as error:
            if not self._failed:  # said once: paddlerd goes on without it
                log.warning("cannot write %s for paddlerctl: %s", self.path, error)
                self._failed = True

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_published(pidfile: Path) -> list[dict[str, Any]]:
    """Every child's published entry (pid None: no process now); empty when there is
    none to read."""
    try:
        data = json.loads(state_path(pidfile).read_text())
    except (OSError, ValueError):
        return []
    children = data.get("children", []) if isinstance(data, dict) else []
    return [child for child in children if isinstance(child, dict)]
