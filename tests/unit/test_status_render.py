from rich.console import Console

from paddler.ctl.status import ProcessInfo, Snapshot, render


def upstream(name: str, total: int, free: int, state: str = "ready") -> dict[str, object]:
    return {
        "name": name,
        "address": f"10.0.0.{total}:8081",
        "model": "tiny",
        "state": state,
        "in_rotation": state == "ready",
        "error": "",
        "slots": {"total": total, "idle": free, "processing": total - free, "free": free},
        "reservations": total - free,
        "last_report_age": 0.4,
    }


def test_a_snapshot_renders_the_fleet_and_the_processes() -> None:
    snapshot = Snapshot(
        upstreams=[
            upstream("gpu0", 2, 1),
            upstream("gpu1", 4, 0),
            upstream("gpu2", 3, 3, state="stale"),
        ],
        queued=5,
        processes=[
            ProcessInfo("paddlerd", 100, 0.0, 20.4),
            ProcessInfo("balancer", 101, 12.0, 48.0),
        ],
        problems=["no slot table at /run/paddler/x: is the balancer running?"],
    )
    console = Console(record=True, width=140, color_system=None)
    console.print(render(snapshot))
    text = console.export_text()
    assert "Fleet: 5/6 slots busy, 5 queued" in text
    lines = text.splitlines()
    gpu0 = next(line for line in lines if "gpu0" in line)
    assert "10.0.0.2:8081" in gpu0
    assert "█████░░░░░ 1/2" in gpu0
    assert "██████████ 4/4" in next(line for line in lines if "gpu1" in line)
    assert "stale" in next(line for line in lines if "gpu2" in line)
    balancer = next(line for line in lines if "balancer" in line)
    assert "101" in balancer
    assert "48 MB" in balancer
    assert "is the balancer running?" in text
