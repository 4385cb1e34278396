"""Attack 3 (issue 11): forge and blind the audit.

On main a user's process could open channel sessions itself: through a forward
to the enforcer's socket (`ssh -N -L 127.0.0.1:P:<data_dir>/enforcer.sock`, as
sshd's child) or from ~/.bashrc (which runs before the wrapper, in the
connection's cgroup), with a made-up command and addr.remote recorded in
session.start; and a 1 MiB request made an event over the audit stream's limit
that stopped the host's spool for good. Now a channel takes every fact from its
connection and needs real stdio (SCM_RIGHTS: no forward carries that), requests
are strictly decoded, and every user-controlled field is bounded.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pytest

from tests.adversarial.conftest import as_user, log_events
from tests.support.procs import wait_for
from tests.test_ssh_sessions import _connectable, free_port

pytestmark = pytest.mark.bpf

FORGED = {"kind": "channel", "command": ["made-up"], "addr_remote": "6.6.6.6:1", "user": "victim"}


def test_the_example_config_does_not_forward_to_the_enforcer_socket(hostile):
    login, key = hostile.server.add_user()
    port = free_port()
    sock = hostile.node.data_dir / "enforcer.sock"
    fwd = subprocess.Popen(hostile.server.ssh_argv(login, key, "-N", "-L", f"127.0.0.1:{port}:{sock}"),
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _connectable(port), what="ssh to listen on the forward")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(json.dumps(FORGED).encode() + b"\n")
            s.settimeout(5)
            try:
                reply = s.recv(4096)
            except (ConnectionResetError, TimeoutError):
                reply = b""
        assert b'"ok":true' not in reply
    finally:
        fwd.terminate()
        fwd.wait(10)
    assert not [e for e in log_events(hostile.data_dir) if "made-up" in json.dumps(e)]


def test_a_forward_to_the_socket_where_one_is_allowed_still_opens_nothing(
        nats_server, data_dir, services, enforcer, sshd):
    """Even where an operator allows stream-local forwarding, a request arriving through it comes
    from sshd without stdio: it cannot open a session or put anything in the audit trail."""
    services("policy", "audit")
    node = enforcer()
    server = sshd(node, extra_config="AllowStreamLocalForwarding yes\n")
    login, key = server.add_user()
    port = free_port()
    target = f"127.0.0.1:{port}:{node.data_dir}/enforcer.sock"
    fwd = subprocess.Popen(server.ssh_argv(login, key, "-N", "-L", target))
    try:
        wait_for(lambda: _connectable(port), what="ssh to listen on the forward")
        for request in (FORGED, {"kind": "channel", "command": ["made-up"]}):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(json.dumps(request).encode() + b"\n")
                reply = json.loads(s.makefile().readline())
            assert reply["ok"] is False, reply
    finally:
        fwd.terminate()
        fwd.wait(10)
    time.sleep(1)
    assert not [e for e in log_events(data_dir) if "made-up" in json.dumps(e) or "6.6.6.6" in json.dumps(e)]


BASHRC = r"""
python3 - <<'PY'
import array, json, os, socket
s = socket.socket(socket.AF_UNIX)
s.connect("@SOCKPATH@")
r, w = os.pipe()
def ask(req):
    s2 = socket.socket(socket.AF_UNIX); s2.connect("@SOCKPATH@")
    fds = array.array("i", [r, w, w])
    s2.sendmsg([json.dumps(req).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    print("BASHRC", s2.makefile().readline().strip(), flush=True)
ask(@FORGED@)
ask({"kind": "channel", "command": ["x" * (1024 * 1024 - 100)]})
PY
"""


def test_bashrc_cannot_forge_a_session_or_blind_the_audit(hostile):
    login, key = hostile.server.add_user()
    sock = hostile.node.data_dir / "enforcer.sock"
    as_user(login, ".bashrc", BASHRC.replace("@SOCKPATH@", str(sock)).replace("@FORGED@", repr(FORGED)))
    result = hostile.server.ssh(login, key, "echo sid=$RINGFENCE_SESSION_ID")
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
               if line.startswith("BASHRC")]
    assert replies, (result.stdout, result.stderr)
    assert replies[0]["ok"] is False and "unknown field" in replies[0]["error"], replies
    sid = re.search(r"sid=(\S+)", result.stdout).group(1)
    events = wait_for(lambda: (evs := log_events(hostile.data_dir)) and any(e["sid"] == sid for e in evs) and evs,
                      what=f"the events of session {sid}")
    assert not [e for e in events if "6.6.6.6" in json.dumps(e) or e["user"] == "victim"]
    # The huge request opened a session (the user's own, running as the user, truthfully recorded),
    # but its event fits the stream: the host's later events are still delivered.
    later = hostile.server.ssh(login, key, "true")
    assert later.returncode == 0
    huge = wait_for(lambda: [e for e in log_events(hostile.data_dir) if e["event"] == "session.start"
                             and e["initial_command"] and e["initial_command"][0].startswith("xxxx")],
                    what="the huge session's start event")
    assert huge[0]["truncated"] is True and len(json.dumps(huge[0])) < 64 * 1024
    assert huge[0]["addr.remote"] == next(e for e in events if e["sid"] == sid)["addr.remote"]
    wait_for(lambda: sum(1 for e in log_events(hostile.data_dir) if e["event"] == "session.end"
                         and e["login"] == login) >= 3, what="every later session's end in events.log")
