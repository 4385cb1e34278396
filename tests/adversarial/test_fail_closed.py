"""Attack 8 (issue 11): be let in while the enforcer starts, or keep roles that changed.

On main the enforcer's socket accepted sessions before the policy, locks and
users were loaded (a session admitted then ran unrestricted and kept no roles
for good). Now the socket opens only once all of them are in place, and
running sessions take their users' roles when users or roles change.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.support.enforcer import EnforcerNode, policy, put_policy
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf


def _slow_starting_node(nats_server, data_dir, services) -> EnforcerNode:
    """An enforcer starting against a big policy: it takes a moment to load, long enough to be
    asked in between."""
    services("policy", "audit")
    allow = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(60_000)] + ["127.0.0.0/8"]
    put_policy(nats_server.url, policy(allow, ["127.0.0.5"]))
    node = EnforcerNode(nats_server.url, data_dir / "node")
    node.proc.start()
    return node


def test_no_session_is_admitted_before_the_policy_is_in_the_maps(nats_server, data_dir, services):
    node = _slow_starting_node(nats_server, data_dir, services)
    try:
        sock = node.data_dir / "enforcer.sock"
        wait_for(sock.exists, timeout=90, interval=0.002, what="the enforcer's socket")
        # The first session it admits is already restricted.
        first = node.probe("tcp:127.0.0.5:9", timeout=60)
        assert first == {"tcp:127.0.0.5:9": "eperm"}, first
        assert "revision" in node.log() and node.log().index("applied") < node.log().index("session socket at")
    finally:
        node.cleanup()


def test_status_lists_the_enforcer_only_once_it_admits_sessions(nats_server, data_dir, services):
    # `ringfence up` then `ringfence run`: once status lists the node's enforcer, its socket is open.
    node = _slow_starting_node(nats_server, data_dir, services)

    def listed() -> bool:
        argv = ["status", "--format", "json", "--wait", "0.05", "--nats-url", nats_server.url]
        out = subprocess.run([sys.executable, "-m", "ringfence.cli.main", *argv], capture_output=True, text=True,
                             timeout=60, cwd=ROOT).stdout
        return any(i.get("metadata", {}).get("nodename") == node.nodename for i in json.loads(out)["instances"])

    try:
        wait_for(listed, timeout=90, interval=0.01, what="the enforcer in `ringfence status`")
        assert (node.data_dir / "enforcer.sock").exists()
    finally:
        node.cleanup()


def test_a_running_session_takes_its_users_new_roles(nats_server, data_dir, services, enforcer, tmp_path):
    services("policy", "locks", "audit")
    node = enforcer()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args, "--nats-url", nats_server.url],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    for role in ("dev", "contractor"):
        doc = tmp_path / f"{role}.yaml"
        doc.write_text(f"kind: role\nversion: v5\nmetadata:\n  name: {role}\n")
        assert cli("create", "-f", str(doc)).returncode == 0
    assert cli("users", "add", "erin", "--roles", "dev").returncode == 0
    assert cli("lock", "--role", "contractor", "--message", "contractors are off today").returncode == 0
    session = node.popen("sleep", "300", user="erin", login="root")
    wait_for(lambda: "roles dev" in node.log(), what="erin's session with role dev")
    time.sleep(0.5)
    assert session.poll() is None  # dev is not locked
    assert cli("users", "update", "erin", "--set-roles", "contractor").returncode == 0
    session.wait(15)  # the lock on contractor now applies to erin's running session
    assert "contractors are off today" in session.stderr.read()
