"""What an ordinary session user who wants around Ringfence can do, tried with a real
sshd (Debian's stock /etc/pam.d/sshd plus our line where the README puts it, the
example sshd config), real logins and real BPF. Each test names the attack; each
attack worked on main before the fix that its test's commit names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.enforcer import policy, put_policy
from tests.support.procs import ROOT, wait_for

DENIED = "127.0.0.5"


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args, "--nats-url", url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def log_events(data_dir: Path) -> list[dict]:
    path = data_dir / "log" / "events.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def as_user(login: str, relative: str, content: str, mode: int = 0o644) -> Path:
    """A file the user wrote in their home."""
    path = Path(f"/home/{login}") / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(path.parent, login, login)
    path.write_text(content)
    path.chmod(mode)
    shutil.chown(path, login, login)
    return path


@pytest.fixture
def hostile(nats_server, data_dir, services, enforcer, sshd, tmp_path):
    """A restricted node (127.0.0.5 denied) with sshd wired as the README says."""
    services("policy", "locks", "audit")
    trusted = tmp_path / "trusted_user_ca_keys"
    trusted.write_text("")
    node = enforcer(config=f"ssh_service:\n  trusted_user_ca_keys: {trusted}\n")
    server = sshd(node)
    trusted.write_text(Path(f"{server.ca}.pub").read_text())  # the site's CA (sshd's TrustedUserCAKeys too)
    put_policy(nats_server.url, policy(["127.0.0.0/8", "::1"], [DENIED]))
    wait_for(lambda: "1 deny" in node.log(), what="policy applied")
    return SimpleNamespace(url=nats_server.url, data_dir=data_dir, node=node, server=server, tmp=tmp_path)
