"""Issue 3 end to end: `ringfence create -f` -> policy -> enforcer BPF -> EPERM ->
audit service -> events.log -> `ringfence events search`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.enforcer import NETPROBE
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf

NETPOLICY = """\
kind: network_restrictions
version: v4
metadata:
  name: network-restrictions
spec:
  allow:
    - cidr: 10.0.0.0/8
    - cidr: fe80::/10
    # Allow localhost
    - cidr: 127.0.0.0/8
    - cidr: ::1/128
  deny:
    # the "finance database"
    - cidr: 127.0.0.5
"""


def cli(nats_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args, "--nats-url", nats_url],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)


def log_events(data_dir: Path) -> list[dict]:
    path = data_dir / "log" / "events.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_operator_flow_denial_reaches_events_log_and_search(nats_server, data_dir, services, enforcer, tmp_path):
    services("policy", "audit")
    node = enforcer()
    target = "tcp:127.0.0.5:8080"

    (tmp_path / "netpolicy.yaml").write_text(NETPOLICY)
    created = cli(nats_server.url, "create", "-f", str(tmp_path / "netpolicy.yaml"))
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "network restrictions have been updated"
    got = cli(nats_server.url, "get", "network_restrictions", "--format", "json")
    assert "127.0.0.5/32" in got.stdout or "127.0.0.5" in got.stdout

    wait_for(lambda: node.probe(target)[target] == "eperm", what="the policy to reach the enforcer")
    result = node.probe(target, user="demo", login="root", with_caller=True)
    assert result[target] == "eperm"
    sid = node.sessions_started()[-1]

    def denial():
        return [e for e in log_events(data_dir) if e["event"] == "session.network" and e["sid"] == sid]

    [event] = wait_for(denial, timeout=20, what="the denial in events.log")
    server_id = (node.data_dir / "host_uuid").read_text().strip()
    expected = {
        "event": "session.network", "code": "T4002I", "user": "demo", "login": "root", "sid": sid,
        "namespace": "default", "server_id": server_id, "cluster_name": "ringfence",
        "pid": result["_pid"], "program": result["_comm"], "src_addr": "0.0.0.0",
        "dst_addr": "127.0.0.5", "dst_port": 8080, "version": 4, "operation": 0, "action": 1,
    }
    assert {k: event[k] for k in expected} == expected
    assert re.fullmatch(r"[0-9a-f-]{36}", event["uid"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
    assert isinstance(event["cgroup_id"], int) and event["cgroup_id"] > 0
    session_events = wait_for(
        lambda: (evs := [e for e in log_events(data_dir) if e["sid"] == sid])[-1]["event"] == "session.end" and evs,
        what="session.end",
    )
    assert [e["event"] for e in session_events] == ["session.start", "session.network", "session.end"]
    assert [e["ei"] for e in session_events] == [0, 1, 2]

    found = cli(nats_server.url, "events", "search", "--type", "session.network", "--sid", sid, "--format", "json")
    assert found.returncode == 0, found.stderr
    [line] = found.stdout.strip().splitlines()
    assert json.loads(line)["uid"] == event["uid"]
    by_user = cli(nats_server.url, "events", "search", "--user", "demo", "--since", "1h", "--format", "json")
    assert event["uid"] in by_user.stdout

    removed = cli(nats_server.url, "rm", "network_restrictions")
    assert removed.stdout.strip() == "network restrictions have been reset to defaults (allow all)"
    wait_for(lambda: node.probe(target)[target] == "allowed", what="allow-all after rm")
    changes = [e["event"] for e in log_events(data_dir) if e["event"].startswith("network_restrictions")]
    assert changes == ["network_restrictions.update", "network_restrictions.reset"]


def test_denials_while_the_enforcer_is_down_are_written_once_each(nats_server, data_dir, services, enforcer, tmp_path):
    services("policy", "audit")
    node = enforcer()
    (tmp_path / "netpolicy.yaml").write_text(NETPOLICY)
    assert cli(nats_server.url, "create", "-f", str(tmp_path / "netpolicy.yaml")).returncode == 0
    wait_for(lambda: node.probe("tcp:127.0.0.5:9")["tcp:127.0.0.5:9"] == "eperm", what="policy applied")

    out = tmp_path / "attempts.jsonl"
    with open(out, "w") as sink:
        proc = node.popen(sys.executable, NETPROBE, "--loop", "8", "--interval", "0.02", "tcp:127.0.0.5:9",
                          stdout=sink, user="mallory")
    opened = r"session (\S+) opened: local, user mallory"
    sid = wait_for(lambda: re.findall(opened, node.log()), what="the loop session")[0]
    time.sleep(1)
    node.kill()
    time.sleep(2.5)
    node.restart()
    assert proc.wait(30) == 0
    attempts = [json.loads(line) for line in out.read_text().splitlines()]
    assert {a["tcp:127.0.0.5:9"] for a in attempts} == {"eperm"}

    def written():
        events = [e for e in log_events(data_dir) if e["sid"] == sid]
        return events if events and events[-1]["event"] == "session.end" else None

    events = wait_for(written, timeout=30, what="the session to end in events.log")
    denials = [e for e in events if e["event"] == "session.network"]
    assert len(denials) == len(attempts)  # nothing lost while the enforcer was down
    assert len({e["uid"] for e in denials}) == len(denials)  # nothing written twice
    assert all(e["user"] == "mallory" and e["action"] == 1 for e in denials)
    assert [e["ei"] for e in events] == list(range(len(events)))

