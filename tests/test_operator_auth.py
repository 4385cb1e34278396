"""Operator identity and RBAC on control requests, against a real nats-server and real services
with `operator_auth: required`: the CLI signs, every service checks and applies the user's roles."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import nats
import pytest
import yaml

from ringfence import auth
from ringfence.cli.bootstrap import bootstrap_admin
from ringfence.config import load_config
from ringfence.contract import api, names
from ringfence.contract.resources import LockTarget
from ringfence.contract.streams import ensure_streams
from ringfence.keyfiles import read_identity, write_identity
from tests.support.nats import audit_events
from tests.support.procs import wait_for

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ringfence.cli.main"]
REQUIRED = {"RINGFENCE_OPERATOR_AUTH": "required"}
CREATED = re.compile(r'^Created a lock with name "([0-9a-f-]{36})"\.$')

# The seed's role, verbatim.
LOCKSMITH_YAML = """\
kind: role
version: v5
metadata:
  name: locksmith
spec:
  allow:
    rules:
    - resources: [lock]
      verbs: [list, create, read, update, delete]
"""


class Stack:
    def __init__(self, url: str, data_dir: Path, home: Path) -> None:
        self.url = url
        self.data_dir = data_dir  # holds admin.nk, as on a server node after `ringfence up`
        self.home = home  # the operator's $HOME (~/.ringfence)
        self.admin = data_dir / "admin.nk"

    def cli(self, *args: str, identity: Path | None = None, stdin: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        argv = [*CLI, *args, "--nats-url", self.url, "--data-dir", str(self.data_dir)]
        if identity is not None:
            argv += ["--identity", str(identity)]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
        environ.update({"HOME": str(self.home), **(env or {})})
        return subprocess.run(argv, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60,
                              env=environ)

    def ok(self, *args: str, **kw) -> str:
        out = self.cli(*args, **kw)
        assert out.returncode == 0, out.stderr
        return out.stdout


def bootstrap(url: str, data_dir: Path) -> Path | None:
    async def run():
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            return await bootstrap_admin(js, load_config(None, data_dir=str(data_dir)))
        finally:
            await nc.close()

    return asyncio.run(run())


@pytest.fixture
def stack(nats_server, services, data_dir, tmp_path) -> Stack:
    assert bootstrap(nats_server.url, data_dir) == data_dir / "admin.nk"
    services("policy", "locks", "audit", env=REQUIRED)
    home = tmp_path / "home"
    home.mkdir()
    return Stack(nats_server.url, data_dir, home)


def test_bootstrap_admin_is_created_once(stack):
    assert stat.S_IMODE(os.stat(stack.admin).st_mode) == 0o600
    ident = read_identity(stack.admin)
    assert ident.user == "admin"
    assert bootstrap(stack.url, stack.data_dir) is None  # idempotent: nothing new, file untouched
    assert read_identity(stack.admin) == ident
    users = yaml.safe_load(stack.ok("get", "users/admin"))
    assert users["spec"] == {"roles": ["admin"], "operator_nkey": ident.public_key}
    role = yaml.safe_load(stack.ok("get", "roles/admin"))
    assert role["spec"]["allow"]["rules"] == [{"resources": ["*"], "verbs": ["*"]}]


def test_ringfence_bootstrap_for_stacks_not_started_by_up(nats_server, services, tmp_path):
    services("policy", env=REQUIRED)
    data = tmp_path / "node"
    argv = [*CLI, "bootstrap", "--nats-url", nats_server.url, "--data-dir", str(data)]
    first = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.stdout == f"bootstrap admin identity: {data / 'admin.nk'}\n", first.stderr
    second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.stdout == 'user "admin" exists (or was deleted): nothing to do\n'
    stack = Stack(nats_server.url, data, tmp_path)
    assert yaml.safe_load(stack.ok("get", "users/admin"))["spec"]["roles"] == ["admin"]
    # A deleted admin is not brought back.
    stack.ok("users", "rm", "admin")
    (data / "admin.nk").unlink()
    third = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert third.stdout == second.stdout and not (data / "admin.nk").exists()


def test_signed_request_with_the_right_role_succeeds_and_names_the_verified_actor(stack):
    # Root on the server node: <data_dir>/admin.nk is found without --identity.
    out = stack.ok("lock", "--user", "mallory", "--message", "stop")
    name = CREATED.match(out.strip()).group(1)
    locks = yaml.safe_load(stack.ok("get", "locks", "--format", "yaml"))
    assert locks["metadata"]["name"] == name and locks["spec"]["created_by"] == "admin"
    # A claimed actor without a signature changes nothing: the signature decides who acts.
    created = [e for e in audit_events(stack.url) if e["event"] == "lock.created"]
    assert [e["user"] for e in created] == ["admin"]
    assert stack.ok("rm", f"locks/{name}").strip() == f'lock "{name}" has been deleted'


def test_users_add_operator_writes_a_0600_identity_and_the_locksmith_role_works(stack, tmp_path):
    role_file = tmp_path / "locksmith.yaml"
    role_file.write_text(LOCKSMITH_YAML)
    assert stack.ok("create", "-f", str(role_file)).strip() == "role 'locksmith' has been created"
    out = stack.ok("users", "add", "alice", "--roles", "locksmith", "--operator")
    path = stack.home / ".ringfence" / "alice.nk"
    assert f"written to {path}" in out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    alice = read_identity(path)
    assert alice.user == "alice"
    registered = yaml.safe_load(stack.ok("get", "users/alice"))["spec"]["operator_nkey"]
    assert registered == alice.public_key and alice.public_key in out

    # The locksmith role, verbatim: lock create, list, read, delete...
    name = CREATED.match(stack.ok("lock", "--user", "bob", identity=path).strip()).group(1)
    assert name in stack.ok("get", "locks", "--format", "text", identity=path)
    assert yaml.safe_load(stack.ok("get", f"locks/{name}", identity=path))["spec"]["created_by"] == "alice"
    assert stack.ok("rm", f"locks/{name}", identity=path).strip() == f'lock "{name}" has been deleted'
    # ... and create -f of a lock document (update of an existing one too).
    doc = tmp_path / "lock.yaml"
    doc.write_text("kind: lock\nversion: v2\nmetadata:\n  name: maint\nspec:\n  target:\n    login: root\n")
    stack.ok("create", "-f", str(doc), identity=path)
    stack.ok("create", "-f", str(doc), identity=path)
    # ... but not create -f of a role, nor anything else.
    other = tmp_path / "other.yaml"
    other.write_text(LOCKSMITH_YAML.replace("locksmith", "locksmith2"))
    out = stack.cli("create", "-f", str(other), identity=path)
    assert out.returncode == 1
    assert out.stderr == 'ERROR: access denied to perform action "create" on "role"\n'
    out = stack.cli("create", "-f", str(role_file), identity=path)
    assert out.stderr == 'ERROR: access denied to perform action "update" on "role"\n'
    out = stack.cli("get", "users", identity=path)
    assert out.stderr == 'ERROR: access denied to perform action "list" on "user"\n'
    out = stack.cli("events", "search", "--since", "1h", identity=path)
    assert out.stderr == 'ERROR: access denied to perform action "list" on "event"\n'

    # The identity from ~/.ringfence/identity, and from RINGFENCE_IDENTITY.
    (stack.home / ".ringfence" / "identity").symlink_to(path)
    assert stack.cli("get", "users").stderr == 'ERROR: access denied to perform action "list" on "user"\n'
    stack.ok("get", "locks")
    (stack.home / ".ringfence" / "identity").unlink()
    stack.ok("get", "locks", env={"RINGFENCE_IDENTITY": str(path)})

    # Never overwritten: a second identity for alice needs another file, and replaces the first.
    again = stack.cli("users", "add", "alice", "--roles", "locksmith", "--operator")
    assert again.returncode == 1 and f"{path} already exists" in again.stderr
    assert read_identity(path) == alice
    second = tmp_path / "alice2.nk"
    stack.ok("users", "add", "alice", "--roles", "locksmith", "--operator", "--out", str(second))
    out = stack.cli("get", "locks", identity=path)
    assert out.returncode == 1 and "is not the registered operator key of user \"alice\"" in out.stderr
    stack.ok("get", "locks", identity=second)


def test_a_user_without_permission_gets_exactly_access_denied(stack, tmp_path):
    bob = tmp_path / "bob.nk"
    stack.ok("users", "add", "bob", "--operator", "--out", str(bob))  # no roles at all
    out = stack.cli("lock", "--user", "alice", identity=bob)
    assert out.returncode == 1
    assert out.stderr == 'ERROR: access denied to perform action "create" on "lock"\n'
    assert out.stdout == ""
    assert stack.cli("unlock", "--user", "alice", identity=bob).stderr == (
        'ERROR: access denied to perform action "delete" on "lock"\n')
    assert stack.cli("get", "locks", identity=bob).stderr == 'ERROR: access denied to perform action "list" on "lock"\n'
    assert stack.cli("sessions", "ls", "--ended", identity=bob).stderr == (
        'ERROR: access denied to perform action "list" on "session"\n')
    # A deny rule wins over allow: every verb on everything except deleting locks.
    (tmp_path / "ops.yaml").write_text(
        "kind: role\nversion: v5\nmetadata:\n  name: ops\nspec:\n  allow:\n    rules:\n"
        "    - resources: ['*']\n      verbs: ['*']\n  deny:\n    rules:\n    - resources: [lock]\n"
        "      verbs: [delete]\n")
    stack.ok("create", "-f", str(tmp_path / "ops.yaml"))
    stack.ok("users", "add", "bob", "--roles", "ops", "--operator", "--out", str(tmp_path / "bob2.nk"))
    bob = tmp_path / "bob2.nk"
    name = CREATED.match(stack.ok("lock", "--user", "carol", identity=bob).strip()).group(1)
    assert stack.cli("rm", f"locks/{name}", identity=bob).stderr == (
        'ERROR: access denied to perform action "delete" on "lock"\n')
    stack.ok("events", "search", "--since", "1h", identity=bob)
    # Nothing was changed by the refused requests.
    deleted = [e for e in audit_events(stack.url, 0.5) if e["event"] == "lock.deleted"]
    assert deleted == []


def test_without_an_identity_the_cli_is_refused_with_a_clear_message(stack, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # no admin.nk there
    elsewhere.mkdir()
    out = subprocess.run([*CLI, "lock", "--user", "x", "--nats-url", stack.url, "--data-dir", str(elsewhere)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")},
                              "HOME": str(stack.home)})
    assert out.returncode == 1
    assert out.stderr.startswith("ERROR: request is not signed: control requests need an operator identity")
    bad = tmp_path / "bad.nk"
    bad.write_text("not an identity\n")
    out = stack.cli("get", "locks", identity=bad)
    assert out.stderr == f"ERROR: {bad}: not an operator identity file (expected `user:` and `seed:` lines)\n"
    out = stack.cli("get", "locks", identity=tmp_path / "missing.nk")
    assert out.stderr == f"ERROR: cannot read operator identity {tmp_path / 'missing.nk'}: No such file or directory\n"


# --- refusals, with raw requests ------------------------------------------------------------------------


def raw_requests(url: str, calls) -> list[api.ApiReply]:
    """Send (subject, body, headers) requests in order; their replies."""

    async def run():
        nc = await nats.connect(url)
        try:
            replies = []
            for subject, body, headers in calls:
                msg = await nc.request(subject, body, timeout=10, headers=headers)
                replies.append(msgspec.json.decode(msg.data, type=api.ApiReply))
            return replies
        finally:
            await nc.close()

    return asyncio.run(run())


def test_unsigned_forged_stale_replayed_and_unknown_requests_are_refused(stack, tmp_path):
    admin = read_identity(stack.admin)
    stranger = auth.Identity(user="admin", seed=auth.new_user_seed())
    subject = names.api_subject(names.LOCKS_API, "get")
    body = msgspec.json.encode(api.GetRequest(kind="lock"))
    now = time.time()
    good = auth.sign_request(admin, subject, body, now)
    forged = dict(auth.sign_request(admin, subject, body, now), **{auth.HEADER_ACTOR: "alice"})
    altered = auth.sign_request(admin, subject, body, now)
    stale = auth.sign_request(admin, subject, body, now - 120)
    future = auth.sign_request(admin, subject, body, now + 120)
    unknown = auth.sign_request(stranger, subject, body, now)
    nobody = auth.sign_request(auth.Identity("nobody", stranger.seed), subject, body, now)
    claimed = {auth.HEADER_ACTOR: "admin"}
    replies = raw_requests(stack.url, [
        (subject, body, good),
        (subject, body, good),  # the same request again: a replay
        (subject, body, None),
        (subject, body, claimed),
        (subject, body, forged),
        (subject, body.replace(b"lock", b"user"), altered),
        (subject, body, stale),
        (subject, body, future),
        (subject, body, unknown),
        (subject, body, nobody),
    ])
    assert replies[0].ok, replies[0].error
    errors = [(r.kind, r.error) for r in replies[1:]]
    assert all(kind == "access_denied" for kind, _ in errors), errors
    messages = [e for _, e in errors]
    assert messages[0] == f"request refused: nonce {good[auth.HEADER_NONCE]} was already used (a replayed request)"
    assert messages[1].startswith("request is not signed: control requests need an operator identity")
    assert messages[2] == messages[1]
    assert messages[3].startswith(f"request refused: the signature does not verify with key {admin.public_key}")
    assert messages[4] == messages[3]
    assert re.match(r"request refused: its timestamp is 12\ds old \(at most 60s either way", messages[5])
    assert re.match(r"request refused: its timestamp is 1[12]\ds in the future", messages[6])
    assert messages[7].startswith(f'request refused: key {stranger.public_key} is not the registered operator '
                                  'key of user "admin"')
    assert messages[8].startswith(f'request refused: key {stranger.public_key} is not the registered operator '
                                  'key of user "nobody"')


def test_every_service_checks_and_discovery_stays_open(stack):
    """Each endpoint refuses unsigned requests; $SRV discovery needs nothing."""
    subjects = [names.api_subject(names.POLICY_API, v) for v in ("create", "get", "delete")]
    subjects += [names.api_subject(names.LOCKS_API, v) for v in ("create", "lock", "get", "delete", "unlock")]
    subjects += [names.api_subject(names.AUDIT_API, v) for v in ("search", "recordings", "recording")]
    replies = raw_requests(stack.url, [(s, b"{}", None) for s in subjects])
    for subject, reply in zip(subjects, replies, strict=True):
        assert not reply.ok and reply.error.startswith("request is not signed"), (subject, reply)
    out = subprocess.run([*CLI, "status", "--nats-url", stack.url, "--wait", "0.5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert "missing: enforcer" in out.stdout and "\npolicy " in "\n" + out.stdout, out.stdout


def test_a_new_identity_or_role_works_at_once_in_every_service(stack, tmp_path):
    """No wait for the services' mirrors: a miss is checked against the bucket itself."""
    role = tmp_path / "auditor.yaml"
    role.write_text("kind: role\nversion: v5\nmetadata:\n  name: auditor\nspec:\n  allow:\n    rules:\n"
                    "    - resources: [event, session]\n      verbs: [list, read]\n")
    stack.ok("create", "-f", str(role))
    for i in range(3):
        path = tmp_path / f"carol{i}.nk"
        stack.ok("users", "add", "carol", "--roles", "auditor", "--operator", "--out", str(path))
        stack.ok("events", "search", "--since", "1h", identity=path)
        stack.ok("sessions", "ls", "--ended", identity=path)
    path = tmp_path / "dave.nk"
    stack.ok("users", "add", "dave", "--roles", "auditor2", "--operator", "--out", str(path))
    assert stack.cli("events", "search", identity=path).stderr == (
        'ERROR: access denied to perform action "list" on "event"\n')
    role.write_text(role.read_text().replace("auditor", "auditor2"))
    stack.ok("create", "-f", str(role))
    stack.ok("events", "search", identity=path)
    stack.ok("users", "rm", "dave")
    out = stack.cli("events", "search", identity=path)
    assert 'is not the registered operator key of user "dave"' in out.stderr


def test_auth_off_accepts_unsigned_requests_with_the_stated_actor(nats_server, services, tmp_path):
    services("locks")  # the fixtures' default: RINGFENCE_OPERATOR_AUTH=off
    ident = auth.Identity(user="ghost", seed=auth.new_user_seed())
    write_identity(tmp_path / "ghost.nk", ident)
    subject = names.api_subject(names.LOCKS_API, "lock")
    body = msgspec.json.encode(api.LockRequest(target=LockTarget(user="x")))
    replies = raw_requests(nats_server.url, [(subject, body, {auth.HEADER_ACTOR: "claimed"}), (subject, body, None)])
    assert all(r.ok for r in replies)
    users = sorted(e["user"] for e in audit_events(nats_server.url) if e["event"] == "lock.created")
    assert users == ["", "claimed"]


# --- users update: nothing is dropped that was not named ---------------------------------------------


def public_key(tmp_path: Path, name: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(tmp_path / name)],
                   check=True)
    return tmp_path / f"{name}.pub"


def fingerprint_of(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def test_users_add_and_update_change_only_what_their_flags_name(stack, tmp_path):
    k1, k2 = public_key(tmp_path, "k1"), public_key(tmp_path, "k2")
    alice_nk = tmp_path / "alice.nk"
    stack.ok("create", "-f", "-", stdin=LOCKSMITH_YAML)
    assert stack.ok("users", "add", "alice", "--roles", "dev", "--key", str(k1), "--operator", "--out",
                    str(alice_nk)).startswith('user "alice" has been created\n')
    nkey = read_identity(alice_nk).public_key

    def spec() -> dict:
        return yaml.safe_load(stack.ok("get", "users/alice"))["spec"]

    # `users add --roles` on an existing user: its key and operator identity stay.
    assert stack.ok("users", "add", "alice", "--roles", "locksmith").strip() == 'user "alice" has been updated'
    assert spec() == {"roles": ["locksmith"], "ssh_public_keys": [k1.read_text().strip()], "operator_nkey": nkey}
    stack.ok("get", "locks", identity=alice_nk)  # the identity still works, with the new role
    # The seed's walkthrough: users update --set-roles "${ROLES},locksmith".
    stack.ok("users", "update", "alice", "--set-roles", "locksmith,dev", "--add-key", str(k2))
    assert spec()["roles"] == ["locksmith", "dev"] and len(spec()["ssh_public_keys"]) == 2
    stack.ok("users", "update", "alice", "--remove-key", fingerprint_of(k1))
    assert spec() == {"roles": ["locksmith", "dev"], "ssh_public_keys": [k2.read_text().strip()],
                      "operator_nkey": nkey}
    stack.ok("users", "update", "alice", "--remove-key", str(k2))
    assert "ssh_public_keys" not in spec()

    # Bad input names the problem and changes nothing.
    gone = stack.cli("users", "update", "alice", "--remove-key", str(k1))
    assert gone.returncode == 1 and f'--remove-key: user "alice" has no key "{fingerprint_of(k1)}"' in gone.stderr
    assert stack.cli("users", "update", "nobody", "--set-roles", "dev").stderr == (
        'ERROR: user "nobody" not found; create it with ringfence users add nobody\n')
    bad = stack.cli("users", "update", "alice", "--set-roles", "dev,bad role")
    assert 'spec.roles[1]: "bad role" is not a valid name' in bad.stderr
    assert stack.cli("users", "update", "alice").stderr.startswith("ERROR: nothing to change")
    assert spec()["roles"] == ["locksmith", "dev"]
    updates = [e for e in audit_events(stack.url) if e["event"] == "user.update"]
    assert [(e["name"], e["code"], e["user"]) for e in updates][-1] == ("alice", "T1003I", "admin")


# --- locks bind operators -------------------------------------------------------------------------------------


def test_a_locked_operator_is_refused_and_cannot_lift_their_own_lock(stack, tmp_path):
    stack.ok("create", "-f", "-", stdin=LOCKSMITH_YAML)
    alice = tmp_path / "alice.nk"
    stack.ok("users", "add", "alice", "--roles", "locksmith", "--operator", "--out", str(alice))
    name = CREATED.match(stack.ok("lock", "--user", "alice", "--message", "Suspicious activity.").strip()).group(1)
    refused = 'ERROR: lock targeting User:"alice" is in force: Suspicious activity.\n'
    wait_for(lambda: stack.cli("get", "locks", identity=alice).stderr == refused)
    # Her roles allow removing locks, but not while she is locked herself: not by name, not by target.
    assert stack.cli("rm", f"locks/{name}", identity=alice).stderr == refused
    assert stack.cli("unlock", "--user", "alice", identity=alice).stderr == refused
    assert stack.cli("lock", "--user", "bob", identity=alice).stderr == refused
    # Another operator whose roles allow it lifts it; then she works again.
    assert stack.ok("rm", f"locks/{name}").strip() == f'lock "{name}" has been deleted'
    wait_for(lambda: stack.cli("get", "locks", identity=alice).returncode == 0)
    # A lock on one of her roles keeps her out too.
    stack.ok("lock", "--role", "locksmith", "--message", "maintenance")
    wait_for(lambda: stack.cli("get", "locks", identity=alice).stderr ==
               'ERROR: lock targeting Role:"locksmith" is in force: maintenance\n')
    assert stack.ok("unlock", "--role", "locksmith").startswith("removed 1 lock")

