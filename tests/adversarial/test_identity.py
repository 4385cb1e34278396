"""Attack 2 (issue 11): pick any identity.

On main a certificate's key ID named the user whoever signed it: `cert-authority
<own CA>` in the user's own authorized_keys and `ssh-keygen -s own_ca -I victim`
made the session "victim", and a lock on the real identity did not stop it. Now
key IDs count only for CAs in ssh_service.trusted_user_ca_keys; otherwise the
certified key is looked up like a plain key.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.adversarial.conftest import cli, log_events
from tests.support.procs import wait_for
from tests.support.sshd import keygen

pytestmark = pytest.mark.bpf

SHOW = "echo user=$RINGFENCE_USER"


def own_ca_certificate(server, login: str, key: Path, key_id: str) -> Path:
    """What any user can do: make a CA, trust it in their own authorized_keys, sign their key."""
    ca = keygen(server.dir / f"{login}-own-ca")
    auth = Path(f"/home/{login}/.ssh/authorized_keys")
    auth.write_text(auth.read_text() + f"cert-authority {Path(f'{ca}.pub').read_text()}")
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", key_id, "-n", login, f"{key}.pub"], check=True)
    return Path(f"{key}-cert.pub")


def test_a_certificate_from_the_users_own_ca_names_nobody(hostile):
    login, key = hostile.server.add_user()
    assert cli(hostile.url, "users", "add", "alice", "--roles", "dev", "--key", f"{key}.pub").returncode == 0
    wait_for(lambda: "user=alice" in hostile.server.ssh(login, key, SHOW).stdout, what="alice's key to count")
    cert = own_ca_certificate(hostile.server, login, key, "victim")
    forged = hostile.server.ssh(login, key, SHOW, "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes")
    assert forged.returncode == 0, forged.stderr
    assert "user=alice" in forged.stdout and "victim" not in forged.stdout  # the certified key is alice's

    # A lock on the real identity stops the certificate too.
    assert cli(hostile.url, "lock", "--user=alice", "--message=stolen laptop").returncode == 0
    refused = wait_for(lambda: (r := hostile.server.ssh(login, key, SHOW, "-o", f"CertificateFile={cert}"))
                       .returncode != 0 and r, what="the lock to refuse the certificate login")
    assert "stolen laptop" in refused.stdout + refused.stderr
    assert not [e for e in log_events(hostile.data_dir) if e["user"] == "victim"]


def test_a_certificate_from_the_sites_ca_names_its_key_id(hostile):
    login, key = hostile.server.add_user()
    cert = hostile.server.certify(key, "carol@example.com", login)
    result = hostile.server.ssh(login, key, SHOW, "-o", f"CertificateFile={cert}")
    assert "user=carol@example.com" in result.stdout, result.stderr


def test_require_registered_identity_refuses_unknown_keys(nats_server, data_dir, services, enforcer, sshd):
    services("policy", "audit")
    node = enforcer(config="ssh_service:\n  require_registered_identity: true\n")
    server = sshd(node)
    login, key = server.add_user()
    result = server.ssh(login, key, SHOW)
    said = result.stdout + result.stderr  # sshd prints PAM's messages on the session's stdout
    assert result.returncode != 0 and "is not registered to any Ringfence user" in said, result
    assert "user=" not in result.stdout
    rejected = wait_for(lambda: [e for e in log_events(data_dir) if e["event"] == "session.rejected"],
                        what="session.rejected")
    assert "require_registered_identity" in rejected[0]["reason"]
