"""Attack 6 (issue 11) and issue 13's session sharing modes.

On main anyone holding cli.nk (no operator identity, no role) subscribed to
ringfence.live.> and read every user's terminal, and no session.join was
written. Now nothing but the enforcer's own credential touches live output:
a join is a signed request authorised by the operator's roles for the mode
asked (observer, peer, moderator), written as session.join with the verified
operator, and its frames are sealed to that join's key.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid

import nats
import pytest

from tests.support.nats import free_port
from tests.support.procs import ROOT, wait_for
from tests.test_nats_security import RINGFENCE, _env
from tests.test_ssh_sessions import Terminal

pytestmark = pytest.mark.bpf

ROLES = """\
kind: role
version: v7
metadata:
  name: auditor
spec:
  allow:
    rules:
      - resources: [session]
        verbs: [list, read]
---
kind: role
version: v7
metadata:
  name: pair
spec:
  allow:
    join_sessions:
      - name: pair with anyone
        roles: ["*"]
        kinds: [ssh]
        modes: [peer]
"""


@pytest.fixture
def stack(tmp_path):
    nodename = f"up{uuid.uuid4().hex[:8]}"
    data, home, port = tmp_path / "data", tmp_path / "home", free_port()
    home.mkdir()
    env = _env(home, nodename)
    url = f"nats://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    up = subprocess.Popen([*RINGFENCE, "up", "--data-dir", str(data), "--nats-port", str(port),
                           "--web-listen", "off"], cwd=ROOT, env=env, stdout=open(log, "wb"),  # noqa: SIM115
                          stderr=subprocess.STDOUT)

    def cli(*args: str, identity: str | None = None) -> subprocess.CompletedProcess:
        extra = ["--identity", identity] if identity else []
        return subprocess.run([*RINGFENCE, *args, "--data-dir", str(data), "--nats-url", url, *extra], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    try:
        wait_for(lambda: cli("status", "--wait", "0.5").returncode == 0, timeout=90, what="the stack under up")
        (tmp_path / "roles.yaml").write_text(ROLES)
        assert cli("create", "-f", str(tmp_path / "roles.yaml")).returncode == 0
        ids = {}
        for name, roles in (("watcher", "auditor"), ("buddy", "auditor,pair")):
            out = tmp_path / f"{name}.nk"
            assert cli("users", "add", name, "--roles", roles, "--operator", "--out", str(out)).returncode == 0
            ids[name] = str(out)
        yield type("Stack", (), {"cli": staticmethod(cli), "ids": ids, "url": url, "data": data, "log": log,
                                 "env": env})
    finally:
        up.terminate()
        up.wait(60)
        from services.enforcer.uninstall import uninstall
        uninstall(nodename, kill_sessions=True)


def _session(stack) -> tuple[Terminal, str]:
    term = Terminal([*RINGFENCE, "run", "--data-dir", str(stack.data), "--user", "dana", "--", "bash", "--norc", "-i"],
                    env=stack.env)
    term.type('echo "S""ID=$RINGFENCE_SESSION_ID"\n')
    sid = term.wait_match(r"SID=([0-9a-f-]{36})").group(1)
    return term, sid


def _events(stack) -> list[dict]:
    out = stack.cli("events", "search", "--since", "10m", "--format", "json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_the_cli_credential_alone_reads_no_terminal(stack):
    term, sid = _session(stack)
    seen: list[bytes] = []
    errors: list[str] = []

    async def eavesdrop():
        async def on_error(exc):
            errors.append(str(exc))

        nc = await nats.connect(stack.url, nkeys_seed=str(stack.data / "nats" / "cli.nk"), error_cb=on_error)
        async def keep(msg):
            seen.append(msg.data)

        await nc.subscribe("ringfence.live.>", cb=keep)
        await nc.subscribe("ringfence.join.>", cb=keep)
        await nc.flush()
        term.type("echo secret-$((6*7))\n")
        watcher = subprocess.Popen([*RINGFENCE, "sessions", "join", sid, "--data-dir", str(stack.data),
                                    "--nats-url", stack.url, "--identity", stack.ids["watcher"]],
                                   stdout=open(watched, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,  # noqa: SIM115
                                   env=stack.env)
        await asyncio.to_thread(wait_for, lambda: b"joined session" in watched.read_bytes(), 30,
                                what="the join")
        term.type("echo more-secret-$((6*7))\n")
        await asyncio.to_thread(wait_for, lambda: b"more-secret-42" in watched.read_bytes(), 30,
                                what="the joiner to see the output")
        watcher.terminate()
        watcher.wait(10)
        await nc.close()

    watched = stack.data.parent / "watched.out"
    asyncio.run(eavesdrop())

    assert any('permissions violation for subscription to "ringfence.live.>"' in e for e in errors), errors
    assert seen, "the join's frames were not even published"
    assert not any(b"secret-42" in data for data in seen)  # sealed: the credential alone reads nothing
    assert b"more-secret-42" in watched.read_bytes()  # the authorised joiner reads them
    joins = wait_for(lambda: [e for e in _events(stack) if e["event"] == "session.join" and e["sid"] == sid],
                     what="session.join")
    assert joins[0]["user"] == "watcher" and joins[0]["mode"] == "observer"
    term.type("exit\n")
    term.close()


def test_modes_need_their_own_role_rule_and_a_peer_can_type(stack):
    term, sid = _session(stack)
    refused = stack.cli("sessions", "join", sid, "--mode", "peer", identity=stack.ids["watcher"])
    assert refused.returncode == 1 and f'access denied to join session "{sid}" as peer' in refused.stderr
    killed = stack.cli("sessions", "kill", sid, identity=stack.ids["watcher"])
    assert killed.returncode == 1 and 'access denied to perform action "delete" on "session"' in killed.stderr

    peer = Terminal([*RINGFENCE, "sessions", "join", sid, "--mode", "peer", "--data-dir", str(stack.data),
                     "--nats-url", stack.url, "--identity", stack.ids["buddy"]], env=stack.env)
    peer.read_until("you can type")
    time.sleep(1)
    peer.type("echo typed-by-$((40+2))\r")
    term.read_until("typed-by-42")
    peer.type("\x1d")  # Ctrl-] leaves
    peer.close()
    events = wait_for(lambda: [e for e in _events(stack) if e["sid"] == sid and e["event"] == "session.leave"],
                      what="session.leave")
    assert events[0]["user"] == "buddy"
    term.type("exit\n")
    term.close()
