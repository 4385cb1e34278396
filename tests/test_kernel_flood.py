"""Issue 12: a flood of kernel denials larger than the ring buffer, from a session
that ends right after it. Every denial must reach the audit stream either as a
session.network event carrying the session's user and sid, or counted in an
audit.events_lost (or audit.events_folded) event that names the session."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.enforcer import policy, put_policy
from tests.support.nats import audit_events
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf


def test_a_flood_larger_than_the_ring_buffer_is_fully_accounted_for_by_session(nats_server, enforcer, tmp_path):
    flood = tmp_path / "deny_flood"
    subprocess.run(["cc", "-O2", "-o", str(flood), str(ROOT / "bench" / "deny_flood.c")], check=True)
    flood.chmod(0o755)
    node = enforcer(config="ssh_service:\n  enhanced_recording:\n    ring_buffer_kib: 16\n")  # ~200 records
    node.wait_applied(put_policy(nats_server.url, policy(["127.0.0.0/8"], ["127.1.0.0/16"])))
    out = node.run(str(flood), "20000", "0", user="mallory", login="root").stdout
    denials = int(out.split()[1])
    assert denials == 20000
    sid = node.sessions_started()[-1]

    def accounted() -> tuple[list[dict], int] | None:
        events = [e for e in audit_events(nats_server.url, wait=0.5) if e["sid"] == sid]
        network = [e for e in events if e["event"] == "session.network"]
        counted = sum(e["lost"] for e in events if e["event"] == "audit.events_lost") + sum(
            e["count"] for e in events if e["event"] == "audit.events_folded")
        return (network, counted) if len(network) + counted >= denials else None

    network, counted = wait_for(accounted, timeout=60, what="every denial in the audit stream")
    assert len(network) + counted == denials
    assert counted > 0  # the ring buffer did overflow: this test means something
    assert {(e["user"], e["login"]) for e in network} == {("mallory", "root")}
    assert len({e["uid"] for e in network}) == len(network)
