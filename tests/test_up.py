"""`ringfence up` starts NATS and the four services; `status` sees them; nothing outlives it."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from ringfence.runtime import nats_security
from tests.support.nats import free_port
from tests.support.procs import ROOT, wait_for
from tests.support.stack import UpStack

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


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_up_runs_all_four_and_stops_without_leftovers(tmp_path, stop_signal):
    stack = UpStack(tmp_path)
    try:
        stack.start()  # `status` found the stack through the data dir alone (the URL up recorded)
        url_file = stack.data_dir / "nats_url"
        assert url_file.read_text() == f"nats://127.0.0.1:{stack.port}\n"
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        result = status(f"nats://127.0.0.1:{stack.port}", stack.data_dir)
        for name in ("policy", "locks", "enforcer", "audit"):
            assert f"\n{name} " in "\n" + result.stdout, result.stdout
        assert "all 4 services running" in result.stdout
        children = descendants(stack.proc.pid)
        assert len(children) >= 5, children  # nats-server and four services
        assert (stack.data_dir / "nats" / "jetstream").is_dir()  # JetStream store under the data dir
        assert stack.stop(stop_signal) == 0, stack.log()[-3000:]
        wait_for(lambda: not any(alive(p) for p in children), timeout=10, what="children to exit")
    finally:
        stack.cleanup()
    log = stack.log()
    assert "policy  | " in log and "enforcer| " in log  # output prefixed per service


def test_status_names_missing_services(nats_server, services):
    services("policy", "audit")
    result = status(nats_server.url)
    assert result.returncode == 1
    assert "missing: locks, enforcer" in result.stdout


def test_sigkilled_up_takes_its_children_along(tmp_path):
    stack = UpStack(tmp_path)
    try:
        stack.start()
        children = descendants(stack.proc.pid)
        stack.proc.kill()
        stack.proc.wait()
        wait_for(lambda: not any(alive(p) for p in children), timeout=15, what="orphans to exit")
    finally:
        stack.cleanup()


def test_status_without_nats_is_a_clear_error():
    result = status(f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach NATS" in result.stderr and "ringfence up" in result.stderr


def test_up_reports_a_port_in_use(tmp_path, nats_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
    start = time.monotonic()
    result = subprocess.run(
        [*RINGFENCE, "up", "--data-dir", str(tmp_path / "d"), "--nats-port", str(nats_server.port),
         "--web-listen", "127.0.0.1:0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert f"port {nats_server.port} on 127.0.0.1 is in use" in result.stderr
    assert time.monotonic() - start < 30
    # The web console's port likewise, before anything starts.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        web = taken.getsockname()[1]
        result = subprocess.run([*RINGFENCE, "up", "--data-dir", str(tmp_path / "d"), "--nats-port", str(free_port()),
                                 "--web-listen", f"127.0.0.1:{web}"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {web} on 127.0.0.1 is in use (the web console)" in result.stderr
    assert "--web-listen off" in result.stderr


def free_cluster_ports(size: int = 3) -> int:
    """A client port P such that P..P+size-1 and their route ports (P+2000...) are free."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        wanted = [base + i for i in range(size)] + [base + 2000 + i for i in range(size)]
        try:
            for port in wanted:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free block of ports")


def test_up_cluster_runs_three_nats_nodes_with_every_stream_replicated_three_times(tmp_path):
    port = free_cluster_ports()
    urls = ",".join(f"nats://127.0.0.1:{port + i}" for i in range(3))
    stack = UpStack(tmp_path, "--cluster", "3", port=port)
    data, nodename, up = stack.data_dir, stack.nodename, None
    try:
        stack.start(timeout=90)
        up = stack.proc
        assert (data / "nats_url").read_text() == urls + "\n"  # the CLI here reaches every node
        result = status(urls, data)
        assert "all 4 services running" in result.stdout
        children = descendants(up.pid)
        servers = [p for p in children if "nats-server" in _cmdline(p)]
        assert len(servers) == 3, [_cmdline(p) for p in children]
        log = stack.log()
        assert f"embedded NATS cluster of 3 nodes with JetStream on {urls}" in log
        for i in (1, 2, 3):
            assert f"nats{i}   | " in log
            conf_path = data / "nats" / f"n{i}" / "nats-server.conf"
            assert (data / "nats" / f"n{i}" / "jetstream").is_dir()  # a store of its own
            assert stat.S_IMODE(conf_path.stat().st_mode) == 0o600  # it holds the route secret
            conf = conf_path.read_text()
            assert f"server_name: ringfence-{nodename}-n{i}" in conf
            assert f"listen: 127.0.0.1:{port + i - 1}" in conf
            assert f"listen: 127.0.0.1:{port + 2000 + i - 1}" in conf  # routes
            for peer in range(3):
                assert f"@127.0.0.1:{port + 2000 + peer}" in conf
            # The same users as the single-node `up`, on every node.
            publics = nats_security.ensure_credentials(data / "nats")
            assert nats_security.authorization_block(publics) in conf
        assert stat.S_IMODE((data / "nats" / "route.secret").stat().st_mode) == 0o600
        # Every service was given all three URLs and replicas 3.
        for svc in ("policy", "locks", "audit", "enforcer"):
            [argv] = [_cmdline(p) for p in children if f"services.{svc}" in _cmdline(p)]
            assert f"--nats-url {urls} " in argv + " " and "--nats-replicas 3" in argv
        replicas = asyncio.run(_replicas(urls, str(data / "nats" / "up.nk")))
        assert replicas == {s: 3 for s in replicas} and len(replicas) == 6, replicas
        # Control requests work as on one node: signed by the bootstrap admin, under the NATS permissions.
        where = ["--nats-url", urls, "--data-dir", str(data)]
        locked = subprocess.run([*RINGFENCE, "lock", "--user=cluster-test", "--ttl=1h", *where], capture_output=True,
                                text=True, cwd=ROOT, timeout=60)
        assert locked.returncode == 0 and "Created a lock" in locked.stdout, locked.stderr
        unlocked = subprocess.run([*RINGFENCE, "unlock", "--user=cluster-test", *where], capture_output=True,
                                  text=True, cwd=ROOT, timeout=60)
        # read-after-write on the cluster: the lock just made is found
        assert unlocked.returncode == 0 and "removed 1 lock" in unlocked.stdout, unlocked.stdout + unlocked.stderr
        assert stack.stop(signal.SIGTERM, timeout=60) == 0, stack.log()[-3000:]
        wait_for(lambda: not any(alive(p) for p in children), timeout=15, what="children to exit")
    finally:
        stack.cleanup()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def _replicas(urls: str, seed: str) -> dict[str, int]:
    nc = await nats.connect(urls.split(","), nkeys_seed=seed)
    try:
        js = nc.jetstream()
        found = {}
        for stream in ("RINGFENCE_AUDIT", "RINGFENCE_RECORDINGS", "KV_ringfence_policy", "KV_ringfence_locks",
                       "KV_ringfence_sessions", "KV_ringfence_leases"):
            found[stream] = (await js.stream_info(stream)).config.num_replicas
        return found
    finally:
        await nc.close()


def test_up_cluster_refuses_an_external_nats(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
    result = subprocess.run(
        [*RINGFENCE, "up", "--data-dir", str(tmp_path / "d"), "--cluster", "3", "--nats-url", "nats://10.0.0.1:4222"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "--cluster runs its own local NATS nodes" in result.stderr


def test_sigterm_stops_each_service_within_2s_cleanly(tmp_path):
    """A clean stop: every service exits within 2 s of its SIGTERM, nothing in the log but
    what a stop says (no traceback, no warning), and the enforcer's socket is gone."""
    stack = UpStack(tmp_path)
    session = None
    try:
        stack.start()
        # Something to let go of: an open session (it outlives the enforcer, by design).
        run_log = tmp_path / "run.log"
        session = subprocess.Popen([*RINGFENCE, "run", "--user", "demo", "--login", "root", "--", "sleep", "60"],
                                   cwd=ROOT, env=stack.env, stdout=open(run_log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115

        def opened() -> bool:
            assert session.poll() is None, f"ringfence run exited: {run_log.read_text()}"
            return re.search(r"session \S+ opened: local, user demo", stack.log()) is not None

        wait_for(opened, timeout=30, what="the session to open")
        assert (stack.data_dir / "enforcer.sock").is_socket()
        assert stack.stop(signal.SIGTERM) == 0
    finally:
        stack.cleanup()  # ends the session too
        if session is not None:
            session.wait(15)
    log = stack.log()
    took = {name: float(t) for name, t in re.findall(r"^up +\| (\w+) stopped in ([\d.]+)s \(exit code 0\)$", log, re.M)}
    assert set(took) >= {"policy", "locks", "enforcer", "audit", "nats"}, log[-3000:]
    assert all(t <= 2.0 for t in took.values()), took
    assert not re.search(r"Traceback|never retrieved| WARNING | ERROR ", log), log[-3000:]
    assert not (stack.data_dir / "enforcer.sock").exists()
