"""`ringfence up` starts NATS and the four services; `status` sees them; nothing outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.enforcer.uninstall import uninstall
from tests.support.nats import free_port
from tests.support.procs import ROOT, wait_for

RINGFENCE = [sys.executable, "-m", "ringfence.cli.main"]


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry leads to `pid`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def status(url: str, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`ringfence status`; with the data dir of a `ringfence up`, its NATS credential is found there."""
    extra = ["--data-dir", str(data_dir)] if data_dir else []
    return subprocess.run([*RINGFENCE, "status", "--nats-url", url, "--wait", "0.5", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)


@pytest.fixture
def nodename():
    """A node name of its own, so the enforcer's cgroup tree and pinned maps are removed afterwards."""
    name = f"up{uuid.uuid4().hex[:8]}"
    yield name
    uninstall(name, kill_sessions=True)


def start_up(tmp_path: Path, port: int, nodename: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
    env["RINGFENCE_NODENAME"] = nodename
    return subprocess.Popen(
        [*RINGFENCE, "up", "--data-dir", str(tmp_path / "data"), "--nats-port", str(port)],
        cwd=ROOT, env=env, stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_up_runs_all_four_and_stops_without_leftovers(tmp_path, stop_signal, nodename):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    up = start_up(tmp_path, port, nodename)
    try:
        result = wait_for(lambda: (r := status(url, tmp_path / "data")).returncode == 0 and r, timeout=60,
                          what="`ringfence status` to see all four services")
        for name in ("policy", "locks", "enforcer", "audit"):
            assert f"\n{name} " in "\n" + result.stdout, result.stdout
        assert "all 4 services running" in result.stdout
        children = descendants(up.pid)
        assert len(children) >= 5, children  # nats-server and four services
        assert (tmp_path / "data" / "nats" / "jetstream").is_dir()  # JetStream store under the data dir
        up.send_signal(stop_signal)
        assert up.wait(30) == 0, (tmp_path / "up.log").read_text()[-3000:]
        wait_for(lambda: not any(alive(p) for p in children), timeout=10, what="children to exit")
    finally:
        if up.poll() is None:
            up.kill()
    log = (tmp_path / "up.log").read_text()
    assert "policy  | " in log and "enforcer| " in log  # output prefixed per service


def test_status_names_missing_services(nats_server, services):
    services("policy", "audit")
    result = status(nats_server.url)
    assert result.returncode == 1
    assert "missing: locks, enforcer" in result.stdout


def test_sigkilled_up_takes_its_children_along(tmp_path, nodename):
    port = free_port()
    up = start_up(tmp_path, port, nodename)
    try:
        wait_for(lambda: status(f"nats://127.0.0.1:{port}", tmp_path / "data").returncode == 0, timeout=60,
                 what="all services")
        children = descendants(up.pid)
        up.kill()
        up.wait()
        wait_for(lambda: not any(alive(p) for p in children), timeout=15, what="orphans to exit")
    finally:
        if up.poll() is None:
            up.kill()


def test_status_without_nats_is_a_clear_error():
    result = status(f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach NATS" in result.stderr and "ringfence up" in result.stderr


def test_up_reports_a_port_in_use(tmp_path, nats_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
    start = time.monotonic()
    result = subprocess.run(
        [*RINGFENCE, "up", "--data-dir", str(tmp_path / "d"), "--nats-port", str(nats_server.port)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert f"port {nats_server.port} on 127.0.0.1 is in use" in result.stderr
    assert time.monotonic() - start < 30
