"""Issue 11 items 5 and 7: routes around the egress policy that a session user
controls, each tried for real (real BPF, cgroups, logins, ping/raw sockets, at).

The policy allows loopback except 127.0.0.5 (the "finance database"). Every
test makes the attempt the way an attacker would and checks that it fails with
EPERM and leaves an audit event saying who. Without the kernel side of these
fixes (programs attached to the node's session tree only, no raw/ICMP hook)
each attempt reached 127.0.0.5 and left no event: run against main at dc6dfb8,
the ping, raw, outside-session, at-job and passed-socket tests failed with
"allowed" where they expect "eperm".
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import hostenv
from tests.support.enforcer import NETPROBE, policy, put_policy
from tests.support.nats import audit_events
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf

FDPASS = str(ROOT / "tests" / "support" / "fdpass.py")
DENIED, ALLOWED = "127.0.0.5", "127.0.0.6"
POLICY = policy(["127.0.0.0/8", "::1/128"], [DENIED])


def results(stdout: str) -> dict:
    """netprobe's answers, without who made the calls."""
    return {k: v for k, v in json.loads(stdout.strip().splitlines()[-1]).items() if not k.startswith("_")}


def denials(url: str, **match) -> list[dict]:
    return [e for e in audit_events(url, wait=0.5)
            if e["event"] == "session.network" and e["dst_addr"] == DENIED and e["action"] == 1
            and all(e.get(k) == v for k, v in match.items())]


@pytest.fixture
def node(nats_server, enforcer):
    n = enforcer()
    n.wait_applied(put_policy(nats_server.url, POLICY))
    return n


def probe_in_netns(node, ns: str, *targets: str) -> dict:
    """netprobe in a session, inside a namespace where ping sockets are allowed."""
    return results(node.run("ip", "netns", "exec", ns, sys.executable, NETPROBE, *targets, login="root").stdout)


def test_ping_socket_to_a_denied_address_fails_and_is_audited(nats_server, node):
    with hostenv.netns_with_ping() as ns:
        result = probe_in_netns(node, ns, f"ping:{DENIED}", f"ping:{ALLOWED}")
    assert result[f"ping:{DENIED}"] == "eperm"
    assert result[f"ping:{ALLOWED}"] == "allowed"  # judged by destination, not refused wholesale
    sid = node.sessions_started()[-1]
    [event] = wait_for(lambda: denials(nats_server.url, sid=sid), timeout=20, what="the ICMP denial event")
    assert event["operation"] == 2  # a packet of a socket the connect/sendmsg hooks do not see


def test_raw_socket_to_a_denied_address_fails_and_is_audited(nats_server, node):
    with hostenv.netns_with_ping() as ns:
        result = probe_in_netns(node, ns, f"raw:{DENIED}", f"raw:{ALLOWED}")
    assert (result[f"raw:{DENIED}"], result[f"raw:{ALLOWED}"]) == ("eperm", "allowed")
    sid = node.sessions_started()[-1]
    [event] = wait_for(lambda: denials(nats_server.url, sid=sid), timeout=20, what="the raw-socket denial event")
    assert event["operation"] == 2 and event["version"] == 4


def as_login_outside(cgroup, user, *argv: str) -> subprocess.CompletedProcess:
    """What cron does with a job: root, in the daemon's own cgroup, drops to the login and runs it."""
    script = f"echo $$ > {cgroup}/cgroup.procs && exec setpriv --reuid={user.pw_uid} --regid={user.pw_gid} " \
             f"--clear-groups \"$@\""
    return subprocess.run(["sh", "-c", script, "sh", *argv], capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.mark.parametrize("uid", [None, 1_234_567_890], ids=["uid", "directory-sized-uid"])
def test_a_restricted_login_outside_its_session_is_judged_and_audited(nats_server, node, uid):
    with hostenv.login(uid) as user, hostenv.foreign_cgroup() as cgroup:
        before = as_login_outside(cgroup, user, sys.executable, NETPROBE, f"tcp:{DENIED}:9")
        assert results(before.stdout)[f"tcp:{DENIED}:9"] == "allowed"  # never had a session here: not ours
        node.run("true", login=user.pw_name)  # its first session on this node makes it a restricted login
        after = as_login_outside(cgroup, user, sys.executable, NETPROBE, f"tcp:{DENIED}:9", f"udp:{DENIED}:9",
                                 f"tcp:{ALLOWED}:9")
        assert results(after.stdout) == {f"tcp:{DENIED}:9": "eperm", f"udp:{DENIED}:9": "eperm",
                                            f"tcp:{ALLOWED}:9": "allowed"}, after.stderr
        events = wait_for(lambda: len(e := denials(nats_server.url, login=user.pw_name)) == 2 and e,
                          timeout=20, what="both denials outside the session")
    assert {e["reason"] for e in events} == {"outside_session"}
    assert {e["sid"] for e in events} == {""}
    assert [e["operation"] for e in events] == [0, 1]


def test_an_at_job_of_a_restricted_login_is_judged(nats_server, node, tmp_path):
    out = tmp_path / "at.out"
    out.touch()
    out.chmod(0o666)
    with hostenv.login() as user, hostenv.foreign_cgroup() as cgroup:
        node.run("true", login=user.pw_name)
        job = f"{sys.executable} {NETPROBE} tcp:{DENIED}:9 > {out} 2>&1\n"
        queued = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                                 "at", "now"], input=job, capture_output=True, text=True, timeout=30)
        assert queued.returncode == 0, queued.stderr
        # atd -s runs the queue once, as the daemon would: root, outside any session, setuid to the login.
        subprocess.run(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec atd -s"], check=True, timeout=60)
        wait_for(lambda: out.read_text().strip(), timeout=30, what="the at job to run")
        assert results(out.read_text())[f"tcp:{DENIED}:9"] == "eperm"
        wait_for(lambda: denials(nats_server.url, login=user.pw_name, reason="outside_session"), timeout=20,
                 what="the at job's denial event")


def test_a_socket_passed_in_from_outside_is_judged_by_the_session_using_it(nats_server, node, tmp_path):
    path = tmp_path / "pass.sock"
    with hostenv.login() as user:
        server = subprocess.Popen([sys.executable, FDPASS, "serve", str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            used = node.run(sys.executable, FDPASS, "use", str(path), DENIED, "9", login=user.pw_name)
        finally:
            server.kill()
            server.wait()
    assert json.loads(used.stdout) == {"tcp": "eperm", "udp": "eperm"}
    sid = node.sessions_started()[-1]
    events = wait_for(lambda: len(e := denials(nats_server.url, sid=sid)) == 2 and e, timeout=20,
                      what="both denials of the passed-in sockets")
    assert {e["login"] for e in events} == {user.pw_name}


def test_other_logins_and_root_outside_sessions_are_not_judged(nats_server, node):
    with hostenv.login() as restricted, hostenv.login() as other, hostenv.foreign_cgroup() as cgroup:
        node.run("true", login=restricted.pw_name)
        node.run("true", login="root")  # root's sessions never make root a restricted login
        other_result = as_login_outside(cgroup, other, sys.executable, NETPROBE, f"tcp:{DENIED}:9")
        root_result = subprocess.run([sys.executable, NETPROBE, f"tcp:{DENIED}:9"], capture_output=True, text=True)
    assert results(other_result.stdout)[f"tcp:{DENIED}:9"] == "allowed"
    assert results(root_result.stdout)[f"tcp:{DENIED}:9"] == "allowed"
    assert not denials(nats_server.url, reason="outside_session")
