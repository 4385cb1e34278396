"""Migrating from the original: its teleport.yaml starts the stack, its exported resources import,
and what they say takes effect on real SSH sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from services.enforcer.kernel import find_cgroup2
from services.enforcer.uninstall import uninstall
from tests.support.nats import free_port
from tests.support.procs import ROOT, wait_for

RINGFENCE = [sys.executable, "-m", "ringfence.cli.main"]

# A node's /etc/teleport.yaml in the seed's shape (000), with the auth settings of a migrating team.
TELEPORT_YAML = """\
version: v3
teleport:
  nodename: {nodename}
  auth_token: exampletoken
  auth_server: 10.1.1.1:3025
  data_dir: {data_dir}
  log:
    output: stderr
    severity: INFO
auth_service:
  enabled: false
  cluster_name: teleport-quickstart
  authentication:
    type: local
    second_factor: otp
    locking_mode: strict
  session_recording: node-sync
  client_idle_timeout: 15m
proxy_service:
  enabled: false
ssh_service:
  enabled: true
  enhanced_recording:
    # Must be enabled for Restricted Sessions to work.
    enabled: true
    cgroup_path: {cgroup_path}
  restricted_session:
    enabled: true
db_service:
  enabled: true
  databases: [{{name: pg, protocol: postgres, uri: "pg.example.com:5432"}}]
"""


@pytest.fixture
def nodename():
    name = f"mig{uuid.uuid4().hex[:8]}"
    yield name
    uninstall(name, kill_sessions=True)


def cli(data_dir: Path, url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
    return subprocess.run([*RINGFENCE, *args, "--nats-url", url, "--data-dir", str(data_dir)], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_ringfence_up_with_a_teleport_yaml(tmp_path, nodename):
    data_dir = tmp_path / "teleport"
    config = tmp_path / "teleport.yaml"
    config.write_text(TELEPORT_YAML.format(nodename=nodename, data_dir=data_dir, cgroup_path=find_cgroup2()))
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
    log = tmp_path / "up.log"
    up = subprocess.Popen([*RINGFENCE, "up", "--config", str(config), "--nats-port", str(port), "--web-listen", "off"],
                          cwd=ROOT, env=env,
                          stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        status = wait_for(lambda: (r := cli(data_dir, url, "status", "--wait", "0.5")).returncode == 0 and r,
                          timeout=90, what="all four services under `ringfence up --config teleport.yaml`")
        assert "all 4 services running" in status.stdout
        assert nodename in status.stdout  # teleport.nodename
        assert (data_dir / "nats" / "jetstream").is_dir()  # teleport.data_dir
        # The static locking mode is what `get cap` shows, as in the original.
        cap = yaml.safe_load(wait_for(lambda: "strict" in (out := cli(data_dir, url, "get", "cap").stdout) and out))
        assert cap["spec"] == {"locking_mode": "strict"}
        assert cap["metadata"]["labels"] == {"ringfence.dev/origin": "config-file"}
        assert yaml.safe_load(cli(data_dir, url, "get", "rec_config").stdout)["spec"] == {"mode": "node-sync"}
        assert yaml.safe_load(cli(data_dir, url, "get", "networking").stdout)["spec"] == {
            "client_idle_timeout": "15m"}
        # ... and `create -f` leaves it alone while the file sets it.
        refused = cli(data_dir, url, "create", "-f", "-", stdin="kind: cluster_auth_preference\nversion: v2\n"
                      "metadata:\n  name: cluster-auth-preference\nspec:\n  locking_mode: best_effort\n")
        assert refused.returncode == 1 and "set by the policy service's config file" in refused.stderr
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
    text = log.read_text()
    # Each ignored section is named once, by `up`, not once per service.
    assert text.count("db_service: ignored: Ringfence controls OpenSSH sessions, not databases") == 1, text[-3000:]
    assert text.count("teleport.auth_token, teleport.auth_server: ignored") == 1
    assert "proxy_service" not in text  # enabled: false says nothing to ignore


# --- what an import says takes effect on real SSH sessions ------------------------------------------------

EXPORT = Path(__file__).parents[1] / "examples" / "migration" / "tctl-get-all.yaml"


def rf(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RINGFENCE, *args, "--nats-url", url], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def hold(server, login: str, key: Path) -> subprocess.Popen:
    """A connection that lasts until the client goes or the session is ended."""
    return subprocess.Popen([*server.ssh_argv(login, key), "echo up; cat >/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.bpf
def test_an_imported_export_limits_and_locks_real_ssh_sessions(nats_server, services, enforcer, sshd):
    services("policy", "locks", "audit")
    node = enforcer()
    server = sshd(node)
    url = nats_server.url
    alice, alice_key = server.add_user("alice")
    mallory, mallory_key = server.add_user("mallory")
    # Ringfence knows their keys already; the import keeps them (and adds the original's roles).
    for user, key in (("alice@example.com", alice_key), ("mallory@example.com", mallory_key)):
        assert rf(url, "users", "add", user, "--key", f"{key}.pub").returncode == 0
    dry = rf(url, "import", str(EXPORT), "--dry-run")
    assert dry.returncode == 0 and "dry run: nothing was changed; 11 of 18 documents would be imported" in dry.stderr
    assert "contractor" not in rf(url, "get", "roles", "--format", "text").stdout  # nothing changed
    out = rf(url, "import", str(EXPORT))
    assert out.returncode == 0, out.stderr
    assert 'note: document 13 (user "alice@example.com"): kept its Ringfence SSH keys' in out.stdout
    assert 'role \'contractor\' has been created' in out.stdout

    # contractor (max_connections: 1, from the original's role) limits alice fleet-wide.
    wait_for(lambda: "user=alice@example.com" in server.ssh(alice, alice_key, "echo user=$RINGFENCE_USER").stdout
             and "roles contractor" in node.log(), what="alice's imported role at the enforcer")
    first = hold(server, alice, alice_key)
    assert first.stdout.readline().strip() == "up"
    second = server.ssh(alice, alice_key, "echo up")
    assert second.returncode != 0
    assert 'too many concurrent ssh connections for user "alice@example.com" (max=1)' in second.stdout + second.stderr
    first.kill()
    first.wait()
    # The original's lock on mallory refuses her logins, with its message.
    refused = server.ssh(mallory, mallory_key, "echo up")
    assert refused.returncode != 0 and "up" not in refused.stdout
    message = 'lock targeting User:"mallory@example.com" is in force: Suspicious activity.'
    assert message in refused.stdout + refused.stderr


# --- a lock on a key's fingerprint ---------------------------------------------------------------------------------


def fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                          check=True).stdout.split()[1]


@pytest.mark.bpf
def test_a_lock_on_a_key_fingerprint_stops_that_key_and_its_certificate_not_the_users_other_key(
        nats_server, services, enforcer, sshd, tmp_path):
    services("policy", "locks", "audit")
    node = enforcer()
    server = sshd(node)
    url = nats_server.url
    login, stolen = server.add_user("dev")
    spare = tmp_path / "spare"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(spare)], check=True)
    with open(f"/home/{login}/.ssh/authorized_keys", "a") as keys:
        keys.write(Path(f"{spare}.pub").read_text())
    cert = server.certify(stolen, "dave", login)  # a certificate of the stolen key
    session = hold(server, login, stolen)
    assert session.stdout.readline().strip() == "up"

    lock = rf(url, "lock", "--device", fingerprint(Path(f"{stolen}.pub")), "--message", "Stolen laptop.")
    assert lock.returncode == 0, lock.stderr
    assert session.wait(15) != 0  # the running session of that key ends
    message = f'lock targeting Device:"{fingerprint(Path(f"{stolen}.pub"))}" is in force: Stolen laptop.'
    refused = server.ssh(login, stolen, "echo up")
    assert refused.returncode != 0 and message in refused.stdout + refused.stderr
    by_cert = server.ssh(login, stolen, "echo up", "-o", f"CertificateFile={cert}")
    assert by_cert.returncode != 0 and message in by_cert.stdout + by_cert.stderr
    # The same account with its other key still works.
    other = server.ssh(login, spare, "echo up")
    assert other.returncode == 0 and other.stdout.strip() == "up", other.stderr
