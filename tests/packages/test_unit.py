"""The installed systemd unit: accepted by Debian 12's systemd, hardened, and paddlerd
started the way it starts it notifies READY=1 once the balancer serves, STOPPING=1 on
SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from paddler.testbed.ports import free_port
from tests.packages.debian_root import chroot, id_in_root

pytestmark = pytest.mark.packages

REPOSITORY = Path(__file__).resolve().parent.parent.parent
UNIT = "usr/lib/systemd/system/paddlerd.service"
HIGHEST_EXPOSURE = 4.0


def service_section(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings, each with every value it is given (some repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_accepts_the_unit_and_rates_it_hardened(installed_root: Path) -> None:
    verify = chroot(installed_root, "systemd-analyze", "verify", f"/{UNIT}", check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    security = chroot(
        installed_root, "systemd-analyze", "security", "--offline=yes", "paddlerd.service"
    ).stdout
    overall = re.search(r"Overall exposure level for paddlerd\.service: (\d+\.\d+)", security)
    assert overall is not None, security
    assert float(overall.group(1)) <= HIGHEST_EXPOSURE

    # Every exposure that remains is explained to the operator.
    remaining = re.findall(r"^✗ (\S+?)(?:=\S*)?\s{2}", security, flags=re.MULTILINE)
    assert remaining, security
    docs = (REPOSITORY / "docs/packages.md").read_text()
    unexplained = [setting for setting in remaining if f"`{setting}" not in docs]
    assert unexplained == []


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # Abstract, so that it is reachable from inside the root and by paddlerd's user.
    name = f"@paddler-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        sock.settimeout(30)
        yield sock, name


def receive_until(sock: socket.socket, field: str) -> list[str]:
    messages = []
    while True:
        message = sock.recv(4096).decode()
        messages.append(message)
        if field in message.splitlines():
            return messages


def as_the_unit(root: Path, service: dict[str, list[str]], command: str, notify: str) -> list[str]:
    """The argv that runs ``command`` inside the root as the unit's settings say: its
    user and group, no new privileges and no capabilities, its umask, and the environment
    systemd gives a system service."""
    (user,) = service["User"]
    (group,) = service["Group"]
    (umask,) = service["UMask"]
    (runtime,) = service["RuntimeDirectory"]
    (state,) = service["StateDirectory"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    environment = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "USER": user,
        "LOGNAME": user,
        "HOME": f"/var/lib/{state}",
        "SHELL": "/usr/sbin/nologin",
        "RUNTIME_DIRECTORY": f"/run/{runtime}",
        "STATE_DIRECTORY": f"/var/lib/{state}",
        "INVOCATION_ID": uuid.uuid4().hex,
        "NOTIFY_SOCKET": notify,
    }
    for directory in (f"run/{runtime}", f"var/lib/{state}"):
        (root / directory).mkdir(parents=True, exist_ok=True)
        os.chown(root / directory, id_in_root(root, user), id_in_root(root, group, "group"))
    inner = (
        f"chroot {root} setpriv --reuid={user} --regid={group} --init-groups "
        "--no-new-privs --inh-caps=-all --bounding-set=-all env -i "
        + " ".join(f"{key}={value}" for key, value in environment.items())
        + f" {command}"
    )
    # A private mount namespace gives the root a /proc that disappears with it, mounted
    # as ProtectProc= and ProcSubset= make the unit's.
    (protect_proc,) = service["ProtectProc"]
    (proc_subset,) = service["ProcSubset"]
    proc_options = f"hidepid={protect_proc},subset={proc_subset}"
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        f"mount -t proc -o {proc_options} proc {root}/proc && umask {umask} && exec {inner}",
    ]


def install_llama_server(root: Path, binary: Path, model: Path) -> tuple[str, str]:
    """llama-server and a model where the docs tell operators to put them."""
    target = root / "usr/local/lib/llama.cpp"
    shutil.copytree(binary.parent, target, symlinks=True)
    models = root / "var/lib/paddler/models"
    models.mkdir(parents=True)
    shutil.copy2(model, models / model.name)
    return "/usr/local/lib/llama.cpp/llama-server", f"/var/lib/paddler/models/{model.name}"


@pytest.mark.llamacpp
def test_paddlerd_as_the_unit_starts_it_notifies_ready_and_stopping(
    installed_root: Path,
    notify_socket: tuple[socket.socket, str],
    tmp_path: Path,
    llama_server_binary: Path,
    tiny_model: Path,
) -> None:
    root = installed_root
    sock, notify = notify_socket
    service = service_section(root / UNIT)
    proxy, management, upstream = free_port(), free_port(), free_port()
    binary, model = install_llama_server(root, llama_server_binary, tiny_model)
    config = root / "etc/paddler/paddler.toml"
    text = config.read_text()
    text = text.replace("reverseproxy_port = 8080", f"reverseproxy_port = {proxy}")
    text = text.replace("management_port = 8085", f"management_port = {management}")
    token = re.search(r'^management_token = "(.*)"$', text, flags=re.MULTILINE)
    assert token is not None
    config.write_text(
        text.replace("#workers = 4", "workers = 1")
        + f"""
[[llamacpp]]
name = "main"
binary = "{binary}"
model = "{model}"
port = {upstream}
slots = 2
extra_args = ["--threads", "1"]

[[agent]]
name = "main"
local_llamacpp_port = {upstream}
balancers = ["127.0.0.1:{management}"]
management_token = "{token.group(1)}"
monitoring_interval = 0.3
"""
    )

    (check,) = service["ExecStartPre"]
    checked = subprocess.run(
        as_the_unit(root, service, check, notify), capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr

    (start,) = service["ExecStart"]
    log = tmp_path / "paddlerd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            as_the_unit(root, service, start, notify),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready = receive_until(sock, "READY=1")[-1].splitlines()
        # The balancer serves by the time systemd hears READY=1, and the llama-server
        # that paddlerd launched as the unit's user answers through it.
        health = httpx.get(f"http://127.0.0.1:{proxy}/health", timeout=5)
        assert health.status_code == 200
        completion = httpx.post(
            f"http://127.0.0.1:{proxy}/completion",
            json={"prompt": "Hello", "n_predict": 4},
            timeout=30,
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["tokens_predicted"] == 4
        assert f"MAINPID={process.pid}" in ready
        status = Path(f"/proc/{process.pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, flags=re.MULTILINE)
        assert uid is not None
        assert int(uid.group(1)) == id_in_root(root, "paddler")
        pidfile = root / "run/paddler/paddlerd.pid"
        assert pidfile.read_text().strip() == str(process.pid)

        process.send_signal(signal.SIGTERM)
        receive_until(sock, "STOPPING=1")
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
