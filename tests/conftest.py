"""Shared fixtures: a real nats-server per test, and service processes against it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.nats import NatsServer  # noqa: E402
from tests.support.procs import ServiceProcess  # noqa: E402


@pytest.fixture
def nats_server(tmp_path: Path):
    """A real nats-server with JetStream on a random port, store under tmp_path."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    # Session processes run as ordinary logins; they must reach the enforcer's
    # socket and the test's scripts, so open pytest's 0700 directories.
    for p in [tmp_path, *tmp_path.parents]:
        if p == Path("/tmp") or not str(p).startswith("/tmp/"):
            break
        p.chmod(0o755)
    return d


@pytest.fixture
def services(nats_server: NatsServer, data_dir: Path):
    """Start services by name: `services("policy", "audit")`; all stopped at the end."""
    started: list[ServiceProcess] = []

    def start(*names: str, extra: tuple[str, ...] = (), env: dict | None = None) -> list[ServiceProcess]:
        procs = [ServiceProcess(n, nats_server.url, data_dir, *extra, env=env).start() for n in names]
        for p in procs:
            p.wait_ready()
        started.extend(procs)
        return procs

    yield start
    for p in reversed(started):
        p.stop()


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def enforcer(nats_server: NatsServer, data_dir: Path):
    """Start enforcer nodes: `enforcer()` or `enforcer(config="...yaml...")`; uninstalled after the test."""
    from tests.support.enforcer import EnforcerNode

    nodes: list[EnforcerNode] = []

    def start(config: str | None = None, started: bool = True) -> EnforcerNode:
        node = EnforcerNode(nats_server.url, data_dir / f"node{len(nodes)}", config)
        nodes.append(node)
        return node.start() if started else node

    yield start
    for node in nodes:
        node.cleanup()


@pytest.fixture
def sshd(tmp_path: Path):
    """Start a real sshd wired to an enforcer node: `sshd(node)`; stopped and cleaned up after."""
    from tests.support.sshd import SshServer

    servers: list[SshServer] = []

    def start(node, forwarding: bool = True, extra_config: str = "") -> SshServer:
        server = SshServer(tmp_path / f"sshd{len(servers)}", node.data_dir, forwarding=forwarding,
                           extra_config=extra_config)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()

# A suite started in the background of a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every CLI a test interrupts with it: give them the usual Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _signals_left_as_found():
    """Processes a test starts inherit this worker's ignored signals and signal mask: a test that
    leaves SIGINT ignored or blocked breaks every later test that interrupts a CLI."""
    disposition = signal.getsignal(signal.SIGINT)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    changed = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    signal.signal(signal.SIGINT, disposition)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    assert changed == (disposition, mask), f"the test left SIGINT {changed[0]!r}, signal mask {changed[1]!r}"
