"""The balancer process: a Gunicorn master with Uvicorn workers, embedded.

Embedded through gunicorn.app.base.BaseApplication (gunicorn's
examples/standalone_app.py), so no gunicorn command line or config file is
read. Never send USR2 to it: gunicorn's re-exec would run the parent's command
line, not a balancer.
"""

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

import paddler
from paddler.balancer.app import BalancerApp
from paddler.balancer.proxy.affinity import REMEMBERING
from paddler.config import BalancerSettings
from paddler.config.addresses import format_address
from paddler.config.model import (
    EXAMPLE_TOKEN,
    MAX_WORKERS,
    counters_directory,
    names_slots,
    prefix_index_path,
    slot_contents_path,
    slot_table_path,
)
from paddler.metrics import counters
from paddler.prefixes.index import PrefixIndex, PrefixIndexError
from paddler.prefixes.slots import SlotContents, SlotContentsError
from paddler.slots import SlotTable, SlotTableError
from paddler.slots.layout import DEFAULT_MAX_OWNERS, MAX_OWNERS
from paddler.supervisor.spawn import die_with_parent

log = logging.getLogger("paddler.balancer")

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _post_fork(server: Any, worker: Any) -> None:
    # A worker must not outlive its master, even one that was SIGKILLed.
    die_with_parent()


def _child_exit(server: Any, worker: Any) -> None:
    """In the master, when a worker died: release its reservations now, not a second later."""
    try:
        table = SlotTable.open(Path(slot_table_path(server.app.settings)))
    except SlotTableError:
        return
    try:
        table.reclaim_dead_owners(dead_pid=worker.pid)
    finally:
        table.close()
    directory = Path(counters_directory(server.app.settings))
    try:
        counters.fold(directory, directory / f"{worker.pid}{counters.SUFFIX}")
    except OSError as error:
        log.error("cannot keep the counts of worker %d: %s", worker.pid, error)


def _on_exit(server: Any) -> None:
    """In the master, last: remove the table it created (not one a newer balancer made)."""
    path = Path(slot_table_path(server.app.settings))
    try:
        table = SlotTable.open(path, readonly=True)
    except SlotTableError:
        return
    mine = table.creator_pid == os.getpid()
    table.close()
    if mine:
        path.unlink(missing_ok=True)
        Path(prefix_index_path(server.app.settings)).unlink(missing_ok=True)
        Path(slot_contents_path(server.app.settings)).unlink(missing_ok=True)
        shutil.rmtree(counters_directory(server.app.settings), ignore_errors=True)


class BalancerApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: BalancerSettings, app: BalancerApp) -> None:
        self.settings = settings
        self.application = app
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options: dict[str, Any] = {
            "bind": [
                format_address(settings.management_host, settings.management_port),
                format_address(settings.reverseproxy_host, settings.reverseproxy_port),
            ],
            "workers": worker_count(settings),
            "worker_class": "paddler.balancer.worker.BalancerWorker",
            "proc_name": "paddler-balancer",
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "info",
            "graceful_timeout": 30,
            "timeout": 30,
            "keepalive": 5,
            "post_fork": _post_fork,
            "child_exit": _child_exit,
            "on_exit": _on_exit,
        }
        if "control_socket_disable" in self.cfg.settings:
            # Gunicorn 24+ opens a control socket under $HOME; paddlerctl is the control here.
            options["control_socket_disable"] = True
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> BalancerApp:
        return self.application


def warn_about_exposure(settings: BalancerSettings) -> None:
    if settings.management_token == EXAMPLE_TOKEN:
        log.warning(
            "balancer.management_token is still the example's placeholder: anyone "
            "who read the example can register upstreams. Set a random secret."
        )
    if settings.management_token is None and settings.management_host not in LOOPBACK:
        log.warning(
            "THE MANAGEMENT API LISTENS ON %s WITHOUT A TOKEN: anyone who reaches it can "
            "register upstreams and steer traffic. Set balancer.management_token.",
            format_address(settings.management_host, settings.management_port),
        )


def worker_count(settings: BalancerSettings) -> int:
    return settings.workers or min(MAX_WORKERS, os.cpu_count() or 1)


def owner_entries(settings: BalancerSettings) -> int:
    """Room in the table for every worker twice over (old and new ones overlap when a
    worker is replaced), and for the processes that only read it."""
    return min(MAX_OWNERS, max(DEFAULT_MAX_OWNERS, 2 * worker_count(settings) + 8))


def run(settings: BalancerSettings) -> int:
    warn_about_exposure(settings)
    try:
        SlotTable.create(
            Path(slot_table_path(settings)),
            max_upstreams=settings.max_upstreams,
            max_waiters=settings.request_buffer_size,
            max_owners=owner_entries(settings),
        ).close()
    except (OSError, SlotTableError) as error:
        log.error("cannot create the slot table %s: %s", slot_table_path(settings), error)
        return 78
    if settings.routing_policy in REMEMBERING:
        try:
            PrefixIndex.create(Path(prefix_index_path(settings))).close()
        except (OSError, PrefixIndexError) as error:
            log.error("cannot create %s: %s", prefix_index_path(settings), error)
            return 78
    if names_slots(settings):
        try:
            SlotContents.create(Path(slot_contents_path(settings)), settings.max_upstreams).close()
        except (OSError, SlotContentsError) as error:
            log.error("cannot create %s: %s", slot_contents_path(settings), error)
            return 78
    try:
        counters.prepare(Path(counters_directory(settings)))
    except OSError as error:
        log.error("cannot prepare %s: %s", counters_directory(settings), error)
        return 78
    log.info(
        "balancer: proxy on %s, management API on %s, slot table %s, routing %s, hot path %s",
        format_address(settings.reverseproxy_host, settings.reverseproxy_port),
        format_address(settings.management_host, settings.management_port),
        slot_table_path(settings),
        settings.routing_policy,
        paddler.HOT_PATH,
    )
    BalancerApplication(settings, BalancerApp(settings)).run()
    return 0
