"""Locks enforced by the enforcer: running sessions end, new ones are refused,
strict mode locks everyone out when the lock view cannot be trusted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf


def cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args, "--nats-url", url],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def log_events(data_dir: Path) -> list[dict]:
    path = data_dir / "log" / "events.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def lock(url: str, *args: str) -> str:
    result = cli(url, "lock", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('Created a lock with name "')
    return result.stdout.split('"')[1]


@pytest.fixture
def stack(nats_server, data_dir, services, enforcer):
    services("policy", "locks", "audit")
    return nats_server.url, data_dir, enforcer()


def long_session(node, user: str, login: str | None = None) -> subprocess.Popen:
    opened = node.log().count(f"user {user},")  # earlier sessions of this user do not count
    proc = node.popen("sleep", "60", user=user, login=login)
    wait_for(lambda: node.log().count(f"user {user},") > opened, what=f"{user}'s session to open")
    return proc


@pytest.mark.parametrize("target", ["--user=alice", "--login=nobody", "--role=contractor"])
def test_a_lock_ends_matching_sessions_and_refuses_new_ones(stack, target):
    url, data_dir, node = stack
    assert cli(url, "users", "add", "alice", "--roles", "contractor,dev").returncode == 0
    wait_for(lambda: node.run("true", user="alice").returncode == 0 and "roles contractor,dev" in node.log(),
             what="the enforcer to know alice's roles")
    victim = long_session(node, "alice", login="nobody")
    bystander = long_session(node, "bob", login="root")
    started = time.monotonic()
    name = lock(url, target, "--message=Suspicious activity.")
    victim.wait(10)
    elapsed = time.monotonic() - started
    label = {"--user=alice": 'User:"alice"', "--login=nobody": 'Login:"nobody"',
             "--role=contractor": 'Role:"contractor"'}[target]
    message = f"lock targeting {label} is in force: Suspicious activity."
    assert message in victim.stderr.read()
    assert elapsed < 5
    assert bystander.poll() is None  # not matching: untouched
    refused = node.run("true", user="alice", login="nobody", check=False)
    assert refused.returncode == 1 and message in refused.stderr

    def events():
        evs = log_events(data_dir)
        kinds = [e["event"] for e in evs]
        return evs if {"lock.created", "client.disconnect", "session.rejected"} <= set(kinds) else None

    evs = wait_for(events, timeout=20, what="lock events in events.log")
    assert next(e for e in evs if e["event"] == "client.disconnect")["reason"] == message
    assert next(e for e in evs if e["event"] == "session.rejected")["reason"] == message
    assert next(e for e in evs if e["event"] == "lock.created")["name"] == name

    assert cli(url, "rm", f"locks/{name}").stdout.strip() == f'lock "{name}" has been deleted'
    wait_for(lambda: node.run("true", user="alice", login="nobody", check=False).returncode == 0,
             what="sessions allowed again after rm")
    bystander.kill()


def test_unlock_by_target_and_expiry_at_its_instant(stack):
    url, _data_dir, node = stack
    lock(url, "--user=carol", "--message=maintenance", "--ttl=3s")
    wait_for(lambda: node.run("true", user="carol", check=False).returncode == 1, what="the lock to apply")
    wait_for(lambda: node.run("true", user="carol", check=False).returncode == 0, timeout=10,
             what="the lock to expire")
    lock(url, "--user=carol")
    lock(url, "--user=carol", "--message=again")
    wait_for(lambda: node.run("true", user="carol", check=False).returncode == 1, what="the locks to apply")
    unlocked = cli(url, "unlock", "--user=carol")
    assert unlocked.returncode == 0 and "2 locks" in unlocked.stdout
    wait_for(lambda: node.run("true", user="carol", check=False).returncode == 0, what="unlock to apply")


def test_a_lock_on_this_node_ends_everything_on_it(stack):
    url, _data_dir, node = stack
    server_id = (node.data_dir / "host_uuid").read_text().strip()
    victim = long_session(node, "dave")
    lock(url, f"--server-id={server_id}", "--message=node under investigation")
    victim.wait(10)
    assert 'lock targeting Node:"' in victim.stderr.read()


def test_strict_mode_locks_out_when_the_lock_view_is_stale_and_best_effort_keeps_going(
        nats_server, data_dir, services, enforcer, tmp_path):
    services("policy", "locks")
    node = enforcer(config="lock_view_max_staleness: 2s\n")
    url = nats_server.url
    role = tmp_path / "strict-role.yaml"
    role.write_text("kind: role\nversion: v5\nmetadata:\n  name: strict-ops\nspec:\n  options:\n    lock: strict\n")
    assert cli(url, "create", "-f", str(role)).returncode == 0
    assert cli(url, "users", "add", "erin", "--roles", "strict-ops").returncode == 0
    wait_for(lambda: node.run("true", user="erin").returncode == 0 and "roles strict-ops" in node.log(),
             what="the enforcer to know erin's roles")
    strict = long_session(node, "erin")
    relaxed = long_session(node, "frank")
    nats_server.stop()
    strict.wait(15)
    assert "preventive lock-out due to local lock view becoming unreliable" in strict.stderr.read()
    assert relaxed.poll() is None  # best_effort keeps the last known locks
    refused = node.run("true", user="erin", check=False)
    assert "preventive lock-out due to local lock view becoming unreliable" in refused.stderr
    assert node.run("true", user="frank").returncode == 0
    nats_server.start()
    wait_for(lambda: node.run("true", user="erin", check=False).returncode == 0, timeout=30,
             what="strict sessions allowed once the view is current again")
    relaxed.kill()


def test_cluster_wide_strict_mode_from_cap(nats_server, data_dir, services, enforcer, tmp_path):
    services("policy", "locks")
    node = enforcer(config="lock_view_max_staleness: 2s\n")
    url = nats_server.url
    cap = tmp_path / "cap.yaml"
    cap.write_text("kind: cluster_auth_preference\nmetadata:\n  name: cluster-auth-preference\n"
                   "spec:\n  locking_mode: strict\nversion: v2\n")
    created = cli(url, "create", "-f", str(cap))
    assert created.stdout.strip() == "cluster auth preference has been updated"
    assert "locking_mode: strict" in cli(url, "get", "cap").stdout
    wait_for(lambda: "cluster locking mode: strict" in node.log(), what="the enforcer to see the cap")
    victim = long_session(node, "gina")
    nats_server.stop()
    victim.wait(15)
    assert "preventive lock-out" in victim.stderr.read()
    nats_server.start()
