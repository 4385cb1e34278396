"""`ringfence lock`, `unlock`, `create -f`, `get locks` and `rm locks/NAME` as an operator runs them,
against a real nats-server and the real locks service."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import nats
import yaml

from ringfence import locking
from ringfence.contract import names
from ringfence.contract import resources as r
from ringfence.contract.streams import ensure_streams
from ringfence.runtime import kv_read
from tests.support.nats import audit_events
from tests.support.procs import wait_for

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ringfence.cli.main"]
CREATED = re.compile(r'^Created a lock with name "([0-9a-f-]{36})"\.$')

# The seed's document, verbatim (its expiry is long past).
SEED_YAML = """\
kind: lock
version: v2
metadata:
  name: dc7cee9d-fe5e-4534-a90d-db770f0234a1
spec:
  target:
    user: foo@example.com
  message: "Suspicious activity."
  expires: "2021-08-14T22:27:00Z" # RFC3339 format
"""
SEED_NAME = "dc7cee9d-fe5e-4534-a90d-db770f0234a1"


def cli(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--nats-url", url], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=60)


def lock(url: str, *args: str) -> str:
    """`ringfence lock ARGS`; the new lock's name."""
    out = cli(url, "lock", *args)
    assert out.returncode == 0, out.stderr
    m = CREATED.match(out.stdout.strip())
    assert m, out.stdout
    return m.group(1)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def table(url: str) -> list[list[str]]:
    """`get locks --format text` as rows of columns (split on 2+ spaces would break on
    messages; the columns are fixed-width, so cut at the header's positions)."""
    out = cli(url, "get", "locks", "--format", "text")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header, rule = lines[0], lines[1]
    starts = [m.start() for m in re.finditer(r"-+", rule)]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    assert [header[a:b].strip() for a, b in bounds] == ["ID", "Target", "Message", "Expires"]
    return [[line[a:b].strip() for a, b in bounds] for line in lines[2:]]


async def _with_js(url: str, fn):
    nc = await nats.connect(url)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def stored(url: str) -> dict[str, r.Lock]:
    """Every lock in the bucket, by key."""

    async def read(js):
        entries = await kv_read.snapshot(js, await kv_read.open_bucket(js, names.LOCKS_BUCKET))
        return {key: msgspec.json.decode(entry.value, type=r.Lock) for key, entry in entries.items()}

    return asyncio.run(_with_js(url, read))


def put_lock(url: str, lock_: r.Lock) -> None:
    """Write a lock the way the service stores it (for states the CLI cannot reach)."""

    async def put(js):
        await ensure_streams(js)
        kv = await js.key_value(names.LOCKS_BUCKET)
        await kv.put(lock_.metadata.name, r.encode(lock_))

    asyncio.run(_with_js(url, put))


def bucket_seq(url: str) -> int:
    """Every write to the bucket (put or delete) moves this on."""

    async def seq(js):
        return (await js.stream_info(f"KV_{names.LOCKS_BUCKET}")).state.last_seq

    return asyncio.run(_with_js(url, seq))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- lock, get, rm ----------------------------------------------------------------------------------------


def test_lock_list_and_remove(nats_server, services):
    services("locks")
    url = nats_server.url
    before = utcnow()
    foo = lock(url, "--user=foo@example.com", "--message=Suspicious activity.", "--ttl=10h")
    role = lock(url, "--role", "contractor", "--message", "All contractor access is disabled for 10h.")
    until = "2031-08-14T22:27:00Z"
    combo = lock(url, "--login", "root", "--server-id", "363256df-f78a-4d99-803c-bae19da9ede4", "--expires", until)
    assert len({foo, role, combo}) == 3

    locks = stored(url)
    assert set(locks) == {foo, role, combo}
    expires = locking.parse_time(locks[foo].spec.expires)
    assert before + dt.timedelta(hours=10) <= expires <= utcnow() + dt.timedelta(hours=10, seconds=1)
    assert locks[foo].spec.target == r.LockTarget(user="foo@example.com")
    assert locks[role].spec.expires == ""
    assert locks[combo].spec.target == r.LockTarget(login="root", server_id="363256df-f78a-4d99-803c-bae19da9ede4")
    assert locking.parse_time(locks[foo].spec.created) >= before.replace(microsecond=0)

    assert table(url) == [
        [foo, 'User:"foo@example.com"', "Suspicious activity.", locks[foo].spec.expires],
        [role, 'Role:"contractor"', "All contractor access is disabled for 10h.", "never"],
        [combo, 'Login:"root", Node:"363256df-f78a-4d99-803c-bae19da9ede4"', "", until],
    ]
    # The default yaml output reads back with create -f.
    docs = list(yaml.safe_load_all(cli(url, "get", "locks").stdout))
    assert [d["metadata"]["name"] for d in docs] == [foo, role, combo]
    one = cli(url, "get", f"locks/{role}")
    assert yaml.safe_load(one.stdout)["spec"]["target"] == {"role": "contractor"}

    gone = cli(url, "rm", f"locks/{foo}")
    assert (gone.returncode, gone.stdout) == (0, f'lock "{foo}" has been deleted\n')
    again = cli(url, "rm", "locks", foo)
    assert (again.returncode, again.stderr) == (1, f'ERROR: lock "{foo}" not found\n')
    assert cli(url, "get", f"locks/{foo}").stderr == f'ERROR: lock "{foo}" not found\n'
    assert cli(url, "rm", "locks/a/b").stderr == 'ERROR: lock "a/b" not found\n'
    assert set(stored(url)) == {role, combo}


def test_unlock_removes_every_lock_on_exactly_that_target(nats_server, services):
    services("locks")
    url = nats_server.url
    a1 = lock(url, "--user", "alice", "--message", "first")
    a2 = lock(url, "--user", "alice", "--ttl", "1h")
    wider = lock(url, "--user", "alice", "--role", "dev")
    bob = lock(url, "--user", "bob")

    out = cli(url, "unlock", "--user", "alice")
    assert (out.returncode, out.stdout) == (0, 'removed 2 locks targeting User:"alice"\n')
    assert set(stored(url)) == {wider, bob}
    assert a1 not in stored(url) and a2 not in stored(url)

    again = cli(url, "unlock", "--user", "alice")
    assert again.returncode == 1
    assert again.stderr == (f'ERROR: no lock targets User:"alice" exactly; these target it among others: '
                            f'lock "{wider}" (User:"alice", Role:"dev"); remove them with ringfence rm locks/NAME\n')
    out = cli(url, "unlock", "--role", "dev", "--user", "alice")
    assert out.stdout == 'removed 1 lock targeting User:"alice", Role:"dev"\n'
    assert cli(url, "unlock", "--user", "carol").stderr == 'ERROR: no lock targets User:"carol"\n'
    assert cli(url, "unlock").stderr == "ERROR: at least one target field must be set\n"
    assert set(stored(url)) == {bob}


# --- create -f --------------------------------------------------------------------------------------------------


def test_create_f_with_the_seed_document(nats_server, services, tmp_path):
    services("locks", "policy")
    url = nats_server.url
    out = cli(url, "create", "-f", write(tmp_path, "lock.yaml", SEED_YAML))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f'lock "{SEED_NAME}" has been created\n'
    # Its expiry (2021) is long past: accepted, but said so, and removed.
    assert out.stderr == (f'warning: lock "{SEED_NAME}" expired at 2021-08-14T22:27:00Z; it is not in force '
                          "and will be removed\n")
    wait_for(lambda: SEED_NAME not in stored(url), 5, what="the expired seed lock to be removed")
    assert table(url) == []

    # The same document with a future expiry stays; applying it again updates it.
    future = SEED_YAML.replace("2021-08-14", "2031-08-14")
    path = write(tmp_path, "future.yaml", future)
    assert cli(url, "create", "-f", path).stdout == f'lock "{SEED_NAME}" has been created\n'
    assert cli(url, "create", "-f", path).stdout == f'lock "{SEED_NAME}" has been updated\n'
    assert table(url) == [[SEED_NAME, 'User:"foo@example.com"', "Suspicious activity.", "2031-08-14T22:27:00Z"]]

    # What `get locks` prints goes back in unchanged.
    saved = cli(url, "get", "locks").stdout
    assert cli(url, "create", "-f", "-", stdin=saved).stdout == f'lock "{SEED_NAME}" has been updated\n'

    # Mixed with policy documents, each service gets its own.
    role = "kind: role\nversion: v5\nmetadata:\n  name: locksmith\n"
    named = future.replace(SEED_NAME, "maintenance")
    out = cli(url, "create", "-f", write(tmp_path, "mixed.yaml", role + "---\n" + named))
    assert out.stdout.splitlines() == ["role 'locksmith' has been created", 'lock "maintenance" has been created']
    assert set(stored(url)) == {SEED_NAME, "maintenance"}


# --- bad input changes nothing ------------------------------------------------------------------------------------


BAD_LOCKS = """\
kind: lock
version: v2
metadata:
  name: fine
spec:
  target:
    user: alice
---
kind: lock
version: v2
metadata:
  name: no-target
spec:
  target: {}
---
kind: lock
version: v2
metadata:
  name: foo@example.com
spec:
  target:
    role: dev
  expires: next week
"""


BAD_LOCK_COMMANDS = [
    ((), "ERROR: at least one target field must be set"),
    (("--user", ""), "ERROR: at least one target field must be set"),
    (("--user", "a", "--ttl", "10h", "--expires", "2031-01-01T00:00:00Z"),
     "ERROR: use only one of --expires and --ttl"),
    (("--user", "a", "--ttl", "ten"), 'ERROR: --ttl: "ten" is not a duration; use e.g. 90s, 15m, 10h or 1h30m'),
    (("--user", "a", "--ttl", "0s"), 'ERROR: --ttl: "0s" must be longer than zero (leave --ttl out for no expiry)'),
    (("--user", "a", "--expires", "2021-08-14T22:27:00Z"),
     'ERROR: --expires: "2021-08-14T22:27:00Z" is not in the future'),
    (("--user", "a", "--expires", "tomorrow"), 'ERROR: --expires: "tomorrow" is not an RFC 3339 time'),
    (("--user", "a", "--message", "x" * 4097), "ERROR: --message: 4097 characters; at most 4096 are allowed"),
    (("--user", " a"), 'ERROR: --user: " a" is not a valid value'),
]


def test_bad_lock_commands_change_nothing(nats_server, services):
    services("locks")
    url = nats_server.url
    before = bucket_seq(url)
    for args, error in BAD_LOCK_COMMANDS:
        out = cli(url, "lock", *args)
        assert out.returncode == 1 and out.stdout == "", args
        assert out.stderr.startswith(error), out.stderr
    assert bucket_seq(url) == before
    assert audit_events(url, wait=0.3) == []


def test_a_bad_document_stops_the_whole_request(nats_server, services, tmp_path):
    services("locks", "policy")
    url = nats_server.url
    before = bucket_seq(url)
    out = cli(url, "create", "-f", write(tmp_path, "bad.yaml", BAD_LOCKS))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        'ERROR: document 2 (lock "no-target"): spec.target: at least one target field must be set',
        'document 3 (lock "foo@example.com"): metadata.name: "foo@example.com" is not a valid lock name: use a '
        'UUID, or 1-253 letters, digits and "-_=." (not starting or ending with ".")',
        'document 3 (lock "foo@example.com"): spec.expires: "next week" is not an RFC 3339 time; '
        "use e.g. 2021-08-14T22:27:00Z",
    ]
    # A bad lock document also stops the policy documents sent with it.
    role = write(tmp_path, "role.yaml", "kind: role\nversion: v5\nmetadata:\n  name: locksmith\n")
    out = cli(url, "create", "-f", role, "-f", write(tmp_path, "bad2.yaml", BAD_LOCKS))
    assert out.returncode == 1 and "at least one target field must be set" in out.stderr
    assert bucket_seq(url) == before
    assert cli(url, "get", "roles/locksmith").returncode == 1
    assert audit_events(url, wait=0.3) == []


# --- audit events --------------------------------------------------------------------------------------------------


def test_every_change_is_an_audit_event(nats_server, services, tmp_path):
    services("locks")
    url = nats_server.url
    foo = lock(url, "--user=foo@example.com", "--message=Suspicious activity.", "--expires=2031-08-14T22:27:00Z")
    plain = lock(url, "--role", "contractor")
    cli(url, "create", "-f", write(tmp_path, "l.yaml", SEED_YAML.replace("2021-08-14", "2031-08-14")))
    cli(url, "rm", f"locks/{foo}")
    cli(url, "unlock", "--role", "contractor")
    cli(url, "rm", f"locks/{foo}")  # not found: no event
    cli(url, "lock")  # refused: no event
    found = audit_events(url)
    assert [(e["event"], e["code"], e["name"]) for e in found] == [
        ("lock.created", "TLK00I", foo),
        ("lock.created", "TLK00I", plain),
        ("lock.created", "TLK00I", SEED_NAME),
        ("lock.deleted", "TLK01I", foo),
        ("lock.deleted", "TLK01I", plain),
    ]
    created = found[0]
    assert created["target"] == {"user": "foo@example.com"}
    assert (created["message"], created["expires"]) == ("Suspicious activity.", "2031-08-14T22:27:00Z")
    assert "expires" not in found[1] or found[1]["expires"] == ""
    assert found[1]["target"] == {"role": "contractor"}
    assert [e["reason"] for e in found[3:]] == ["deleted", "unlocked"]
    assert all(e["server_id"] and e["uid"] and e["time"] and e["namespace"] == "default" for e in found)


# --- expiry --------------------------------------------------------------------------------------------------------


def test_an_expired_lock_leaves_get_locks_at_its_expiry(nats_server, services):
    services("locks")
    url = nats_server.url
    keep = lock(url, "--user", "bob")
    until = utcnow() + dt.timedelta(seconds=6)  # the CLI takes a second or more to start on a loaded host
    name = lock(url, "--user", "alice", "--expires", locking.format_time(until))
    assert [row[0] for row in table(url)] == [keep, name]
    wait_for(lambda: [row[0] for row in table(url)] == [keep], 15, interval=0.1, what="the lock to expire")
    seen_gone = utcnow()
    assert seen_gone >= until
    assert seen_gone - until < dt.timedelta(seconds=2)
    # The service removes it from the bucket and records why.
    wait_for(lambda: name not in stored(url), 2, what="the expired lock to leave the bucket")
    deleted = [e for e in audit_events(url) if e["event"] == "lock.deleted"]
    assert [(e["name"], e["reason"], e["user"]) for e in deleted] == [(name, "expired", "")]
    assert locking.parse_time(deleted[0]["time"]) >= until.replace(microsecond=until.microsecond // 1000 * 1000)
    assert cli(url, "get", f"locks/{name}").stderr == f'ERROR: lock "{name}" not found\n'


def test_locks_that_expired_while_no_service_ran_are_removed_at_start(nats_server, services):
    url = nats_server.url
    old = r.Lock(metadata=r.Metadata(name="old"),
                 spec=r.LockSpec(target=r.LockTarget(user="a"), expires="2021-08-14T22:27:00Z"))
    live = r.Lock(metadata=r.Metadata(name="live"), spec=r.LockSpec(target=r.LockTarget(user="b")))
    put_lock(url, old)
    put_lock(url, live)
    services("locks")
    wait_for(lambda: set(stored(url)) == {"live"}, 5, what="the start-up sweep")
    deleted = [e for e in audit_events(url) if e["event"] == "lock.deleted"]
    assert [(e["name"], e["reason"]) for e in deleted] == [("old", "expired")]


def test_two_locks_services_record_an_expiry_once(nats_server, services):
    services("locks", "locks")
    url = nats_server.url
    until = utcnow() + dt.timedelta(seconds=8)  # three CLI runs must finish before it
    names_ = [lock(url, "--user", f"u{i}", "--expires", locking.format_time(until)) for i in range(3)]
    wait_for(lambda: not stored(url), 20, what="the locks to expire")
    time.sleep(0.5)
    deleted = [e["name"] for e in audit_events(url) if e["event"] == "lock.deleted"]
    assert sorted(deleted) == sorted(names_)
