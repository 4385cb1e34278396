"""Restricted sessions with real BPF, real cgroups and a real nats-server.

Targets are loopback only (127.0.0.0/8, ::1, ::ffff:127.x); a refused
connection means the packet left the process, i.e. Ringfence allowed it.
"""

from __future__ import annotations

import json
import pwd
import signal
import subprocess
import sys
import time

import pytest

from tests.support.enforcer import NETPROBE, EnforcerNode, delete_policy, policy, put_policy
from tests.support.nats import audit_events
from tests.support.procs import ServiceProcess, wait_for

pytestmark = pytest.mark.bpf

# deny-inside-allow: 127.0.0.0/8 allowed except 127.0.0.5; ::1 allowed; nothing else.
SEED_LIKE = policy(["127.0.0.0/8", "::1/128"], ["127.0.0.5"])


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("tcp:127.0.0.1:9", "allowed"),  # in allow
        ("tcp:127.0.0.5:9", "eperm"),  # deny inside allow
        ("tcp:127.0.0.6:9", "allowed"),
        ("tcp:[::1]:9", "allowed"),  # IPv6 allow
        ("tcp:[::ffff:127.0.0.1]:9", "allowed"),  # IPv4 rules apply to IPv4-mapped
        ("tcp:[::ffff:127.0.0.5]:9", "eperm"),
        ("udp:127.0.0.5:9", "eperm"),  # sendto with a destination: operation 1
        ("udp:127.0.0.1:9", "allowed"),
        ("udpconnect:127.0.0.5:9", "eperm"),  # UDP connect: operation 0
        ("udp:[::ffff:127.0.0.5]:9", "eperm"),
    ],
)
def test_allow_deny_and_deny_inside_allow(nats_server, enforcer, target, expected):
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, SEED_LIKE))
    assert node.probe(target)[target] == expected


def test_ipv6_denied_when_not_allowed_and_deny_beats_a_wider_allow(nats_server, enforcer):
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, policy(["127.0.0.0/8"])))
    assert node.probe("tcp:[::1]:9")["tcp:[::1]:9"] == "eperm"  # not in allow
    node.wait_applied(put_policy(nats_server.url, policy(["::/0", "127.0.0.0/8"], ["::1", "127.0.0.0/16"])))
    result = node.probe("tcp:[::1]:9", "tcp:127.0.0.1:9", "tcp:127.1.0.1:9")
    assert result == {"tcp:[::1]:9": "eperm", "tcp:127.0.0.1:9": "eperm", "tcp:127.1.0.1:9": "allowed"}


def test_allow_all_before_any_resource_and_after_rm(nats_server, enforcer):
    node = enforcer()
    targets = ("tcp:127.0.0.5:9", "tcp:[::1]:9", "udp:127.0.0.9:9")
    assert set(node.probe(*targets).values()) == {"allowed"}
    node.wait_applied(put_policy(nats_server.url, policy([])))  # the resource exists: deny-all
    assert set(node.probe(*targets).values()) == {"eperm"}
    node.wait_applied(delete_policy(nats_server.url))
    assert set(node.probe(*targets).values()) == {"allowed"}


def test_disabled_restricted_sessions_allow_everything(nats_server, enforcer):
    node = enforcer(config="ssh_service:\n  restricted_session:\n    enabled: false\n")
    node.wait_applied(put_policy(nats_server.url, policy([])))
    assert node.probe("tcp:127.0.0.5:9")["tcp:127.0.0.5:9"] == "allowed"


def loop_session(node, seconds: float, *targets: str, interval: float = 0.02, stdout=subprocess.PIPE):
    return node.popen(sys.executable, NETPROBE, "--loop", str(seconds), "--interval", str(interval), *targets,
                      stdout=stdout)


def test_an_update_applies_at_once_to_running_sessions(nats_server, enforcer):
    node = enforcer()
    proc = loop_session(node, 6, "tcp:127.0.0.5:9")
    first = json.loads(proc.stdout.readline())
    assert first["tcp:127.0.0.5:9"] == "allowed"
    rev = put_policy(nats_server.url, SEED_LIKE)
    node.wait_applied(rev)
    applied_at = time.time()
    lines = [json.loads(line) for line in proc.stdout]
    proc.wait()
    after = [r["tcp:127.0.0.5:9"] for r in lines if r["t"] > applied_at + 0.05]
    assert after and set(after) == {"eperm"}


def test_policy_replaced_repeatedly_never_opens_what_both_deny(nats_server, enforcer, tmp_path):
    """127.0.0.5 is denied by both policies, once by a deny entry inside an
    allow and once by not being allowed at all; filler entries make each
    update slow enough that a wrong update order would open a window."""
    filler = [f"10.{i // 256}.{i % 256}.0/24" for i in range(3000)]
    a = policy(["127.0.0.0/8", *filler], ["127.0.0.5"])
    b = policy(["127.0.0.1/32", "127.0.1.0/24", *filler[:1500]], [f"11.0.{i % 256}.{i // 256}" for i in range(1500)])
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, a))
    out = tmp_path / "attempts.jsonl"
    with open(out, "w") as sink:
        proc = loop_session(node, 8, "tcp:127.0.0.5:9", "tcp:127.0.0.1:9", interval=0, stdout=sink)
    revisions = []
    for i in range(12):
        revisions.append(put_policy(nats_server.url, b if i % 2 == 0 else a))
        node.wait_applied(revisions[-1], timeout=20)
    proc.wait(30)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) > 200, "the loop should have made many attempts"
    assert {r["tcp:127.0.0.5:9"] for r in results} == {"eperm"}
    assert {r["tcp:127.0.0.1:9"] for r in results} == {"allowed"}  # allowed by both: stays allowed


def test_non_root_session_cannot_leave_its_cgroup(enforcer, data_dir, tmp_path):
    node = enforcer()
    nobody = pwd.getpwnam("nobody")
    script = tmp_path / "escape.sh"
    script.write_text(
        "#!/bin/sh\n"
        "cat /proc/self/cgroup | grep '^0::'\n"
        "for target in /sys/fs/cgroup/unified/cgroup.procs /sys/fs/cgroup/cgroup.procs "
        "$(dirname $(dirname /sys/fs/cgroup/unified$(sed -n 's/^0:://p' /proc/self/cgroup)))/cgroup.procs; do\n"
        "  [ -e $target ] && (echo $$ > $target) 2>/dev/null && echo ESCAPED $target\n"
        "done\n"
        "cat /proc/self/cgroup | grep '^0::'\n"
    )
    script.chmod(0o755)
    result = node.run(str(script), login="nobody")
    lines = result.stdout.strip().splitlines()
    assert "ESCAPED" not in result.stdout, result.stdout
    assert lines[0] == lines[-1] and f"/ringfence/{node.nodename}/" in lines[0]
    assert nobody.pw_uid != 0


def test_sessions_cannot_open_sessions_and_non_root_cannot_claim_others(enforcer):
    node = enforcer()
    inner = f"{sys.executable} -m ringfence.cli.main run --data-dir {node.data_dir} -- true"
    result = node.run("sh", "-c", inner, check=False)
    assert result.returncode != 0
    assert "already in a session" in result.stderr
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
         "ringfence.cli.main", "run", "--data-dir", str(node.data_dir), "--user", "alice", "--", "true"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "only root may open a session for another user" in result.stderr


def test_sigkilled_enforcer_keeps_enforcing_and_takes_sessions_back(nats_server, enforcer):
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, SEED_LIKE))
    proc = loop_session(node, 12, "tcp:127.0.0.5:9", interval=0.05)
    json.loads(proc.stdout.readline())
    sid = wait_for(node.sessions_started, what="the session to open")[-1]
    node.kill()
    killed_at = time.time()
    time.sleep(2)  # denials keep happening with no enforcer running
    node.restart()
    restarted_at = time.time()
    results = [json.loads(line) for line in proc.stdout]
    proc.wait()
    assert {r["tcp:127.0.0.5:9"] for r in results} == {"eperm"}
    down = [r for r in results if killed_at < r["t"] < restarted_at]
    assert len(down) >= 10  # it really tried while the enforcer was down
    assert f"took back session {sid}" in node.log()
    wait_for(lambda: f"session {sid} ended" in node.log(), timeout=20, what="the session to end")


def test_enforcer_catches_up_with_changes_made_while_it_was_down(nats_server, enforcer):
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, SEED_LIKE))
    node.stop()
    rev = put_policy(nats_server.url, policy(["127.0.0.0/8"]))  # 127.0.0.5 now allowed
    node.restart()
    node.wait_applied(rev)
    assert node.probe("tcp:127.0.0.5:9")["tcp:127.0.0.5:9"] == "allowed"


def test_enforcer_catches_up_after_losing_nats(nats_server, enforcer):
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, SEED_LIKE))
    nats_server.stop()
    time.sleep(1)
    nats_server.start()
    rev = put_policy(nats_server.url, policy(["127.0.0.0/8"]))
    node.wait_applied(rev, timeout=30)
    assert node.probe("tcp:127.0.0.5:9")["tcp:127.0.0.5:9"] == "allowed"


def test_capacity_of_100k_cidrs_per_list(nats_server, enforcer):
    allow = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(100_000)] + ["127.0.0.0/8"]
    deny = [f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(100_000)] + ["127.0.0.5"]
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, policy(allow, deny)), timeout=60)
    result = node.probe("tcp:127.0.0.5:9", "tcp:127.0.0.6:9")
    assert result == {"tcp:127.0.0.5:9": "eperm", "tcp:127.0.0.6:9": "allowed"}


def test_lost_samples_are_counted_and_reported(nats_server, enforcer):
    node = enforcer(config="ssh_service:\n  enhanced_recording:\n    ring_buffer_kib: 4\n")
    node.wait_applied(put_policy(nats_server.url, policy([])))
    flood = (
        "import socket, time\n"
        "time.sleep(1.5)\n"
        "for _ in range(500):\n"
        "    s = socket.socket()\n"
        "    try: s.connect(('127.0.0.5', 9))\n"
        "    except OSError: pass\n"
        "    s.close()\n"
    )
    proc = node.popen(sys.executable, "-c", flood)
    sid = wait_for(node.sessions_started, what="the session to open")[-1]
    node.proc.proc.send_signal(signal.SIGSTOP)  # nobody reads the 4 KiB ring buffer now
    try:
        assert proc.wait(30) == 0
    finally:
        node.proc.proc.send_signal(signal.SIGCONT)
    # The loss names the session it happened to, also when reported after the session ended.
    wait_for(lambda: f"network records lost (session {sid}," in node.log(), timeout=15,
             what="the loss to be reported")

    def reports() -> list[dict]:
        return [e for e in audit_events(nats_server.url, wait=0.5) if e["event"] == "audit.events_lost"]

    [report] = wait_for(reports, what="the loss in the audit stream")
    assert report["sid"] == sid and report["lost"] == report["total"] > 0
    # Another enforcer of the same node, with another data dir, reports nothing again.
    node.stop()
    again = EnforcerNode(nats_server.url, node.data_dir.parent / "elsewhere")
    again.nodename = node.nodename
    again.proc = ServiceProcess("enforcer", nats_server.url, again.data_dir, "--nodename", node.nodename)
    try:
        again.start()
        wait_for(lambda: "drop counters checked" in again.log(), what="a first round of loss reports")
        assert reports() == [report]
    finally:
        again.stop()
