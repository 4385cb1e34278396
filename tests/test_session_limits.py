"""Session control on real SSH: max_connections across the fleet, max_sessions
per connection (OpenSSH multiplexing), client_idle_timeout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import ROOT, wait_for
from tests.test_ssh_sessions import Terminal

pytestmark = pytest.mark.bpf

LIMITED_ROLE = """\
kind: role
version: v5
metadata:
  name: limited
spec:
  options:
    max_connections: {conns}
    max_sessions: {sessions}
"""


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args, "--nats-url", url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def log_events(data_dir: Path) -> list[dict]:
    path = data_dir / "log" / "events.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def limited_user(url: str, tmp_path: Path, server, node, conns: int = 0, sessions: int = 0) -> tuple[str, Path]:
    role = tmp_path / "role.yaml"
    role.write_text(LIMITED_ROLE.format(conns=conns, sessions=sessions))
    assert cli(url, "create", "-f", str(role)).returncode == 0
    login, key = server.add_user()
    assert cli(url, "users", "add", "alice", "--roles", "limited", "--key", f"{key}.pub").returncode == 0
    wait_for(lambda: "user=alice" in server.ssh(login, key, "echo user=$RINGFENCE_USER").stdout,
             what="alice's key to be known")
    wait_for(lambda: "roles limited" in node.log(), what="alice's role to be known")
    return login, key


def hold(server, login: str, key: Path) -> subprocess.Popen:
    """A connection that lasts until the client goes (the remote cat ends when its stdin closes;
    OpenSSH does not signal commands without a pty, so `sleep` would outlive the client)."""
    return subprocess.Popen([*server.ssh_argv(login, key), "echo up; cat >/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_max_connections_across_two_nodes_and_a_freed_slot_is_free_at_once(
        nats_server, data_dir, services, enforcer, sshd, tmp_path):
    services("policy", "audit")
    a, b = enforcer(), enforcer()
    ssh_a, ssh_b = sshd(a), sshd(b)
    login, key = limited_user(nats_server.url, tmp_path, ssh_a, a, conns=2)
    # Both sshds run on this host, so the account and its key work on node b too.
    first = hold(ssh_a, login, key)
    second = hold(ssh_a, login, key)
    for p in (first, second):
        assert p.stdout.readline().strip() == "up"
    third = ssh_b.ssh(login, key, "echo up")  # another node: the count is fleet-wide
    assert third.returncode != 0
    message = 'too many concurrent ssh connections for user "alice" (max=2)'
    assert message in third.stdout + third.stderr
    rejected = wait_for(lambda: [e for e in log_events(data_dir) if e["event"] == "session.rejected"],
                        what="session.rejected")
    assert rejected[0]["reason"] == message and rejected[0]["max"] == 2 and rejected[0]["user"] == "alice"

    first.kill()
    first.wait()
    started = time.monotonic()
    wait_for(lambda: ssh_b.ssh(login, key, "echo up").stdout.strip() == "up", timeout=10,
             what="the freed slot to be usable")
    assert time.monotonic() - started < 5  # released when the session ended, not after a lease TTL
    second.kill()


def test_leases_of_a_dead_enforcer_are_reclaimed_after_the_ttl(nats_server, data_dir, services, enforcer, sshd,
                                                              tmp_path):
    services("policy")
    config = "ssh_service:\n  connection_lease_ttl: 3s\n"
    a, b = enforcer(config=config), enforcer(config=config)
    ssh_a, ssh_b = sshd(a), sshd(b)
    login, key = limited_user(nats_server.url, tmp_path, ssh_a, a, conns=1)
    for i in range(3):  # back to back at the limit: each one's slot is free for the next
        r = ssh_a.ssh(login, key, f"echo run{i}")
        assert r.returncode == 0 and f"run{i}" in r.stdout, r.stdout + r.stderr
    held = hold(ssh_a, login, key)
    assert held.stdout.readline().strip() == "up"
    a.kill()  # its lease is no longer renewed
    assert "too many concurrent ssh connections" in ssh_b.ssh(login, key, "echo up").stdout
    started = time.monotonic()
    wait_for(lambda: ssh_b.ssh(login, key, "echo up").stdout.strip() == "up", timeout=15,
             what="the dead node's lease to expire")
    assert time.monotonic() - started < 8
    held.kill()


def test_max_sessions_with_openssh_multiplexing(nats_server, data_dir, services, enforcer, sshd, tmp_path):
    services("policy", "audit")
    node = enforcer()
    server = sshd(node)
    login, key = limited_user(nats_server.url, tmp_path, server, node, sessions=2)
    control = tmp_path / "cm.sock"
    mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}", "-o", "ControlPersist=60"]
    master = subprocess.Popen([*server.ssh_argv(login, key, *mux, "-N")])
    try:
        wait_for(control.exists, what="the control master")
        channel = [*server.ssh_argv(login, key, *mux), "echo up; cat >/dev/null"]
        one = subprocess.Popen(channel, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        two = subprocess.Popen(channel, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert one.stdout.readline().strip() == "up" and two.stdout.readline().strip() == "up"
        third = server.ssh(login, key, "echo up", *mux)
        assert 'too many session channels for user "alice" (max=2)' in third.stderr
        one.kill()
        one.wait()
        wait_for(lambda: server.ssh(login, key, "echo up", *mux).stdout.strip() == "up", what="a free channel")
        two.kill()
    finally:
        subprocess.run(["ssh", "-o", f"ControlPath={control}", "-O", "exit", "x"], capture_output=True)
        master.kill()


def test_idle_sessions_end_and_active_ones_do_not(nats_server, data_dir, services, enforcer, sshd, tmp_path):
    services("policy", "audit")
    node = enforcer()
    server = sshd(node)
    networking = tmp_path / "networking.yaml"
    networking.write_text("kind: cluster_networking_config\nversion: v2\nmetadata:\n"
                          "  name: cluster-networking-config\nspec:\n  client_idle_timeout: 2s\n")
    assert cli(nats_server.url, "create", "-f", str(networking)).returncode == 0
    login, key = server.add_user()
    wait_for(lambda: "cluster client_idle_timeout: 2s" in node.log(), what="the enforcer to see the timeout")

    busy = Terminal(server.ssh_argv(login, key, "-tt"))
    busy.read_until("$ ")
    for i in range(8):  # typing keeps it alive past the timeout
        busy.type(f"echo tick{i}\n")
        busy.read_until(f"tick{i}\r\n")
        time.sleep(0.5)
    busy.type("exit\n")
    assert busy.close() == 0

    idle = Terminal(server.ssh_argv(login, key, "-tt"))
    idle.read_until("$ ")
    started = time.monotonic()
    text = idle.read_until("Client exceeded idle timeout of 2s", timeout=15)
    assert 1.5 < time.monotonic() - started < 8
    idle.close()
    assert "Client exceeded idle timeout of 2s" in text
    wait_for(lambda: [e for e in log_events(data_dir) if e["event"] == "client.disconnect"
                      and e["reason"] == "Client exceeded idle timeout of 2s"], what="client.disconnect")
