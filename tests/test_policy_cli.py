"""`ringfence create -f`, `get` and `rm` as an operator runs them, against a real policy service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
import yaml

from ringfence.contract import api, names
from ringfence.contract import resources as r
from tests.support.nats import audit_events

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ringfence.cli.main"]

POLICY_YAML = """\
kind: network_restrictions
version: v4
metadata:
  name: network-restrictions
spec:
  allow:
    - cidr: 10.0.0.1/8
    - cidr: fe80::/10
    - cidr: ::1
  deny:
    - cidr: 10.1.2.3
---
kind: role
version: v5
metadata:
  name: locksmith
spec:
  allow:
    rules:
      - resources: [lock]
        verbs: [list, create, read, update, delete]
---
kind: user
version: v2
metadata:
  name: alice
spec:
  roles: [locksmith]
---
"""

BAD_YAML = """\
kind: role
version: v5
metadata:
  name: fine
---
kind: role
version: v5
metadata:
  name: x
spec:
  options:
    max_sessions: -1
---
kind: network_restrictions
version: v4
spec:
  allow:
    - cidr: 1.1.1.1
    - cidr: 2.2.2.2
    - cidr: 3.3.3.3
    - cidr: 10.0.0.0/33
"""


def cli(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--nats-url", url], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=60)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def _with_js(url: str, fn):
    nc = await nats.connect(url)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def kv_value(url: str, key: str) -> bytes | None:
    async def read(js):
        kv = await js.key_value(names.POLICY_BUCKET)
        try:
            return (await kv.get(key)).value
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None

    return asyncio.run(_with_js(url, read))


def kv_last_seq(url: str) -> int:
    """Every write to the bucket (put or delete) moves this on."""

    async def seq(js):
        return (await js.stream_info(f"KV_{names.POLICY_BUCKET}")).state.last_seq

    return asyncio.run(_with_js(url, seq))


def test_create_prints_the_messages_and_stores_every_resource(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    out = cli(url, "create", "-f", write(tmp_path, "policy.yaml", POLICY_YAML))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "network restrictions have been updated",
        "role 'locksmith' has been created",
        'user "alice" has been created',
    ]
    stored = r.decode(kv_value(url, names.NETWORK_RESTRICTIONS_KEY))
    assert [c.cidr for c in stored.spec.allow] == ["10.0.0.0/8", "fe80::/10", "::1/128"]
    assert [c.cidr for c in stored.spec.deny] == ["10.1.2.3/32"]
    assert r.decode(kv_value(url, names.role_key("locksmith"))).metadata.name == "locksmith"
    assert r.decode(kv_value(url, names.user_key("alice"))).spec.roles == ["locksmith"]

    again = cli(url, "create", "-f", write(tmp_path, "policy.yaml", POLICY_YAML))
    assert again.stdout.splitlines()[1:] == ["role 'locksmith' has been updated", 'user "alice" has been updated']


def test_get_shows_resources_in_every_format(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    assert cli(url, "create", "-f", write(tmp_path, "p.yaml", POLICY_YAML)).returncode == 0

    as_yaml = cli(url, "get", "network_restrictions")
    assert as_yaml.returncode == 0, as_yaml.stderr
    [doc] = list(yaml.safe_load_all(as_yaml.stdout))
    assert doc["kind"] == "network_restrictions" and doc["spec"]["deny"] == [{"cidr": "10.1.2.3/32"}]

    as_json = json.loads(cli(url, "get", "net_restrict", "--format", "json").stdout)
    assert as_json == [doc]

    table = cli(url, "get", "network-restrictions", "--format", "text").stdout.splitlines()
    assert table[0].split() == ["List", "CIDR"] and set(table[1]) <= {"-", " "}
    assert [line.split() for line in table[2:]] == [
        ["allow", "10.0.0.0/8"], ["allow", "fe80::/10"], ["allow", "::1/128"], ["deny", "10.1.2.3/32"]]

    by_slash = cli(url, "get", "roles/locksmith").stdout
    assert by_slash == cli(url, "get", "role", "locksmith").stdout
    assert yaml.safe_load(by_slash)["metadata"]["name"] == "locksmith"
    users = cli(url, "get", "users", "--format", "text").stdout.splitlines()
    assert users[2].split() == ["alice", "locksmith", "0"]

    cap = cli(url, "get", "cap")  # never created: the defaults in force
    assert yaml.safe_load(cap.stdout)["spec"] == {"locking_mode": "best_effort"}

    missing = cli(url, "get", "roles/nobody")
    assert missing.returncode == 1 and missing.stderr.strip() == 'ERROR: role "nobody" not found'
    unknown = cli(url, "get", "widgets")
    assert unknown.returncode == 1 and 'unknown kind "widgets"' in unknown.stderr


def test_yaml_output_reads_back_with_create(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    cli(url, "create", "-f", write(tmp_path, "p.yaml", POLICY_YAML))
    dumped = cli(url, "get", "roles").stdout
    out = cli(url, "create", "-f", "-", stdin=dumped)
    assert out.returncode == 0 and out.stdout == "role 'locksmith' has been updated\n"


def test_rm_resets_network_restrictions_and_deletes_roles(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    cli(url, "create", "-f", write(tmp_path, "p.yaml", POLICY_YAML))

    reset = cli(url, "rm", "network_restrictions")
    assert reset.returncode == 0 and reset.stdout == "network restrictions have been reset to defaults (allow all)\n"
    assert kv_value(url, names.NETWORK_RESTRICTIONS_KEY) is None
    assert cli(url, "rm", "network_restrictions").stdout == reset.stdout  # resetting again is fine
    assert "every destination is allowed" in cli(url, "get", "network_restrictions", "--format", "text").stdout
    # YAML says so too, on stderr: stdout stays what `create -f` reads back (here: nothing).
    empty = cli(url, "get", "network_restrictions")
    assert (empty.returncode, empty.stdout) == (0, "")
    assert empty.stderr == "no network restrictions: every destination is allowed\n"

    gone = cli(url, "rm", "roles/locksmith")
    assert gone.returncode == 0 and gone.stdout == 'role "locksmith" has been deleted\n'
    assert kv_value(url, names.role_key("locksmith")) is None
    again = cli(url, "rm", "roles", "locksmith")
    assert again.returncode == 1 and again.stderr.strip() == 'ERROR: role "locksmith" not found'
    unnamed = cli(url, "rm", "users")
    assert unnamed.returncode == 1 and "ringfence rm users/NAME" in unnamed.stderr


def test_a_bad_file_changes_nothing_and_names_entry_and_value(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    before = kv_last_seq(url)
    out = cli(url, "create", "-f", write(tmp_path, "bad.yaml", BAD_YAML))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        'ERROR: document 2 (role "x"): spec.options.max_sessions: -1: must be 0 (no limit) or more',
        'document 3 (network_restrictions): spec.allow[3].cidr: "10.0.0.0/33" is not a valid CIDR',
    ]
    assert out.stdout == ""
    assert kv_last_seq(url) == before
    assert kv_value(url, names.role_key("fine")) is None


def test_documents_are_numbered_per_file_when_several_are_given(nats_server, services, tmp_path):
    services("policy")
    good, bad = write(tmp_path, "good.yaml", POLICY_YAML), write(tmp_path, "bad.yaml", BAD_YAML)
    out = cli(nats_server.url, "create", "-f", good, "-f", bad)
    assert out.returncode == 1
    assert out.stderr.splitlines()[0] == (
        f'ERROR: {bad}: document 2 (role "x"): spec.options.max_sessions: -1: must be 0 (no limit) or more')
    assert kv_value(nats_server.url, names.NETWORK_RESTRICTIONS_KEY) is None


def test_create_reads_standard_input_and_ignores_empty_documents(nats_server, services):
    services("policy")
    text = "---\n---\nkind: cluster_auth_preference\nversion: v2\nspec:\n  locking_mode: strict\n---\n"
    out = cli(nats_server.url, "create", "-f", "-", stdin=text)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "cluster auth preference has been updated\n"
    assert r.decode(kv_value(nats_server.url, names.CAP_KEY)).spec.locking_mode == "strict"
    empty = cli(nats_server.url, "create", "-f", "-", stdin="---\n")
    assert empty.returncode == 1 and "no documents found in <stdin>" in empty.stderr


def test_yaml_mistakes_are_reported_with_file_and_line(nats_server, tmp_path):
    broken = write(tmp_path, "broken.yaml", "kind: role\nmetadata:\n  name: [x\n")
    out = cli(nats_server.url, "create", "-f", broken)
    assert out.returncode == 1 and out.stderr.startswith(f"ERROR: {broken}:4:1: YAML syntax error")
    dup = write(tmp_path, "dup.yaml", "kind: role\nmetadata:\n  name: a\n  name: b\n")
    out = cli(nats_server.url, "create", "-f", dup)
    assert out.stderr.strip() == f'ERROR: {dup}:4:3: YAML syntax error: duplicate key "name"'
    missing = cli(nats_server.url, "create", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_users_may_name_roles_that_do_not_exist_yet(nats_server, services):
    services("policy")
    out = cli(nats_server.url, "create", "-f", "-", stdin="kind: user\nmetadata: {name: bob}\nspec: {roles: [dev]}\n")
    assert out.returncode == 0
    assert out.stdout == 'user "bob" has been created\n'
    assert out.stderr == 'warning: user "bob" refers to role "dev", which does not exist yet\n'


def test_every_change_is_an_audit_event(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    cli(url, "create", "-f", write(tmp_path, "p.yaml", POLICY_YAML))
    cli(url, "create", "-f", "-", stdin="kind: cluster_networking_config\nspec: {client_idle_timeout: 15m}\n")
    cli(url, "rm", "network_restrictions")
    cli(url, "rm", "roles/locksmith")
    cli(url, "rm", "users/alice")
    cli(url, "rm", "roles/locksmith")  # not found: no event
    found = audit_events(url)
    assert [e["event"] for e in found] == [
        "network_restrictions.update", "role.created", "user.create", "cluster_networking_config.update",
        "network_restrictions.reset", "role.deleted", "user.delete",
    ]
    update = found[0]
    assert (update["code"], update["allow"], update["deny"]) == ("RF2001I", 3, 1)
    assert found[1]["code"] == "T9000I" and found[1]["name"] == "locksmith"
    assert found[5]["code"] == "T9001I" and found[5]["name"] == "locksmith"
    assert found[3]["client_idle_timeout"] == "15m"
    assert all(e["server_id"] and e["uid"] and e["time"] for e in found)


def test_a_bad_request_publishes_no_event(nats_server, services, tmp_path):
    services("policy")
    cli(nats_server.url, "create", "-f", write(tmp_path, "bad.yaml", BAD_YAML))
    assert audit_events(nats_server.url) == []


# --- locks go to the locks service ---------------------------------------------------------------

LOCK_YAML = """\
kind: lock
version: v2
metadata:
  name: dc7cee9d-fe5e-4534-a90d-db770f0234a1
spec:
  target:
    user: foo@example.com
  message: Suspicious activity.
"""


def test_without_a_locks_service_a_mixed_request_changes_nothing(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    before = kv_last_seq(url)
    out = cli(url, "create", "-f", write(tmp_path, "p.yaml", POLICY_YAML), "-f", write(tmp_path, "l.yaml", LOCK_YAML))
    assert out.returncode == 1 and "no locks service is running" in out.stderr
    assert kv_last_seq(url) == before
    assert "no locks service is running" in cli(url, "get", "locks").stderr


class FakeLocks:
    """Answers the locks API the way the locks service does, recording each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []

    async def handle(self, msg) -> None:
        verb = msg.subject.rsplit(".", 1)[1]
        body = json.loads(msg.data)
        self.requests.append((verb, body))
        if verb == "get":
            locks = [r.Lock(metadata=r.Metadata(name="dc7cee9d"),
                            spec=r.LockSpec(target=r.LockTarget(user="foo@example.com"), message="Suspicious.")),
                     r.Lock(metadata=r.Metadata(name="5444970a"),
                            spec=r.LockSpec(target=r.LockTarget(role="contractor"), expires="2031-08-14T22:27:00Z"))]
            result: object = locks
        elif verb == "create":
            result = api.CreateResult(messages=[f'Created a lock with name "{d["metadata"]["name"]}".'
                                                for d in body["resources"]])
        else:
            result = api.DeleteResult(message=f'lock "{body["name"]}" has been deleted')
        await msg.respond(api.ok_reply(result))


def run_cli_beside_fake_locks(url: str, *commands: tuple[str, ...], stdin: str | None = None):
    """Run CLI commands while this process answers the locks API."""

    async def main():
        fake = FakeLocks()
        nc = await nats.connect(url)
        await nc.subscribe(f"{names.LOCKS_API}.*", cb=fake.handle)
        await nc.flush()
        outputs = []
        try:
            for args in commands:
                proc = await asyncio.create_subprocess_exec(
                    *CLI, *args, "--nats-url", url, cwd=ROOT, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), 60)
                outputs.append((proc.returncode, out.decode(), err.decode()))
        finally:
            await nc.close()
        return fake, outputs

    return asyncio.run(main())


def test_lock_commands_are_routed_to_the_locks_service(nats_server, services, tmp_path):
    services("policy")
    url = nats_server.url
    policy, lock = write(tmp_path, "p.yaml", POLICY_YAML), write(tmp_path, "l.yaml", LOCK_YAML)
    fake, outputs = run_cli_beside_fake_locks(
        url,
        ("create", "-f", policy, "-f", lock),
        ("get", "locks", "--format", "text"),
        ("rm", "locks/dc7cee9d-fe5e-4534-a90d-db770f0234a1"),
    )
    (rc, created, err), (_, listed, _), (_, removed, _) = outputs
    assert rc == 0, err
    assert created.splitlines() == [
        "network restrictions have been updated",
        "role 'locksmith' has been created",
        'user "alice" has been created',
        'Created a lock with name "dc7cee9d-fe5e-4534-a90d-db770f0234a1".',
    ]
    # The lock batch was checked with a dry run before anything was applied.
    assert [(verb, body.get("dry_run")) for verb, body in fake.requests[:2]] == [("create", True), ("create", False)]
    table = listed.splitlines()
    assert table[0].split() == ["ID", "Target", "Message", "Expires"]
    assert table[2].split() == ["dc7cee9d", 'User:"foo@example.com"', "Suspicious.", "never"]
    assert table[3].split() == ["5444970a", 'Role:"contractor"', "2031-08-14T22:27:00Z"]
    assert removed == 'lock "dc7cee9d-fe5e-4534-a90d-db770f0234a1" has been deleted\n'
    assert fake.requests[-1] == ("delete", {"kind": "lock", "name": "dc7cee9d-fe5e-4534-a90d-db770f0234a1"})
    assert msgspec.json.decode(kv_value(url, names.user_key("alice")))["kind"] == "user"


def test_an_error_is_a_micro_service_error_with_a_code_and_the_same_reply(nats_server, services):
    services("policy")

    async def ask(body: bytes):
        nc = await nats.connect(nats_server.url)
        try:
            return await nc.request(names.api_subject(names.POLICY_API, "get"), body, timeout=10)
        finally:
            await nc.close()

    unknown = asyncio.run(ask(msgspec.json.encode(api.GetRequest(kind="widgets"))))
    assert unknown.headers["Nats-Service-Error-Code"] == "400"
    reply = msgspec.json.decode(unknown.data, type=api.ApiReply)
    assert (reply.ok, reply.kind) == (False, "invalid") and reply.error.startswith('unknown kind "widgets"')
    assert unknown.headers["Nats-Service-Error"] == reply.error.splitlines()[0]
    missing = asyncio.run(ask(msgspec.json.encode(api.GetRequest(kind="role", name="nope"))))
    assert missing.headers["Nats-Service-Error-Code"] == "404"
    malformed = asyncio.run(ask(b"{"))
    assert malformed.headers["Nats-Service-Error-Code"] == "400"
    assert msgspec.json.decode(malformed.data, type=api.ApiReply).error.startswith("malformed request")
