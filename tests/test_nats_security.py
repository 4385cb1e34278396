"""NATS security of the embedded server: every client authenticates with its role's nkey and may
publish and subscribe only where its role needs to; `ringfence up` generates all of it, bootstraps
the first admin, and the CLI finds both credentials on the server node."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import KeyNotFoundError

from ringfence import auth
from ringfence.contract import names
from ringfence.contract.streams import ensure_streams
from ringfence.keyfiles import read_identity, write_secret
from ringfence.runtime import kv_read, nats_security
from services.enforcer.uninstall import uninstall
from tests.support.nats import NatsServer, free_port
from tests.support.procs import ROOT, wait_for

RINGFENCE = [sys.executable, "-m", "ringfence.cli.main"]


@pytest.fixture
def secured(tmp_path):
    """A nats-server configured as `ringfence up` configures the embedded one; {role: seed path}."""
    creds_dir = tmp_path / "creds"
    publics = nats_security.ensure_credentials(creds_dir)
    server = NatsServer(tmp_path / "nats", extra_conf=nats_security.authorization_block(publics)).start()
    seeds = {role: str(nats_security.seed_path(creds_dir, role)) for role in nats_security.ROLES}
    asyncio.run(_as(server.url, seeds["up"], lambda nc: ensure_streams(nc.jetstream())))
    yield server, seeds
    server.stop()


async def _as(url: str, seed: str | None, action, errors: list | None = None, connect_timeout: float = 2):
    async def on_error(exc):
        if errors is not None:
            errors.append(str(exc))

    nc = await nats.connect(url, nkeys_seed=seed, error_cb=on_error, allow_reconnect=False,
                            max_reconnect_attempts=1, connect_timeout=connect_timeout)
    try:
        return await action(nc)
    finally:
        await nc.close()


def test_credentials_are_0600_and_created_once(tmp_path):
    first = nats_security.ensure_credentials(tmp_path)
    assert set(first) == {"policy", "locks", "audit", "enforcer", "cli", "up", "web", "sys", "issuer"}
    for role in first:
        path = nats_security.seed_path(tmp_path, role)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert nats_security.ensure_credentials(tmp_path) == first
    assert len(set(first.values())) == 9
    assert first["issuer"].startswith("A")  # an account key: it signs joined nodes' user JWTs


def test_unauthenticated_and_wrong_credentials_are_refused(secured, tmp_path):
    """Neither is a user of the file, so the server asks the auth callout (the policy service, not
    running here) and refuses them when no answer comes within the authorization timeout."""
    server, _ = secured
    wrong = write_secret(tmp_path / "wrong.nk", auth.new_user_seed() + "\n")
    for n, seed in enumerate((None, str(wrong)), 1):
        with pytest.raises((NatsError, NoServersError, TimeoutError)):
            asyncio.run(_as(server.url, seed, lambda nc: nc.flush(nats_security.AUTH_TIMEOUT + 2),
                            connect_timeout=nats_security.AUTH_TIMEOUT + 2))
        wait_for(lambda n=n: server.log.read_text().count("authentication error") >= n, timeout=5,
                 what="the server to refuse the client")


async def _stream_count(nc, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.messages


async def _try_publish(nc, subject: str, headers=None) -> str:
    """Publish and wait for a JetStream ack; 'stored', or what went wrong."""
    try:
        await nc.jetstream().publish(subject, b'{"x":1}', timeout=1.0, headers=headers)
        return "stored"
    except NatsTimeout:
        return "no ack"
    except Exception as exc:  # e.g. no responders
        return type(exc).__name__


def test_cli_cannot_publish_audit_events_nor_write_the_buckets(secured):
    server, seeds = secured
    errors: list[str] = []

    async def attack(nc):
        async def request(subject: str) -> str:
            try:
                await nc.request(subject, b"", timeout=1.0)
                return "answered"
            except NatsTimeout:
                return "no answer"

        async def read() -> str:
            try:
                await nc.jetstream().key_value(names.POLICY_BUCKET)  # not even readable directly
                return "read"
            except NatsTimeout:
                return "no answer"

        # All at once: each refusal is a 1 s timeout.
        attempts = {
            "audit": _try_publish(nc, names.audit_subject("n1", "lock.created")),
            "recording": _try_publish(nc, names.recording_subject("n1", str(uuid.uuid4()))),
            "policy": _try_publish(nc, f"$KV.{names.POLICY_BUCKET}.{names.role_key('admin')}"),
            "locks": _try_publish(nc, f"$KV.{names.LOCKS_BUCKET}.x"),
            "sessions": _try_publish(nc, f"$KV.{names.SESSIONS_BUCKET}.x"),
            **{verb: request(f"$JS.API.STREAM.{verb}.KV_{names.POLICY_BUCKET}") for verb in ("PURGE", "DELETE")},
            "read": read(),
        }
        results = dict(zip(attempts, await asyncio.gather(*attempts.values()), strict=True))
        await nc.flush()
        return results

    results = asyncio.run(_as(server.url, seeds["cli"], attack, errors))
    assert set(results.values()) == {"no ack", "no answer"}, results
    assert any('permissions violation for publish to "ringfence.audit.n1.lock.created"' in e for e in errors), errors
    assert any(f"$kv.{names.POLICY_BUCKET}" in e.lower() for e in errors), errors

    async def counts(nc):
        return [await _stream_count(nc, s) for s in (names.AUDIT_STREAM, names.RECORDINGS_STREAM,
                                                      f"KV_{names.POLICY_BUCKET}", f"KV_{names.LOCKS_BUCKET}")]

    assert asyncio.run(_as(server.url, seeds["policy"], counts)) == [0, 0, 0, 0]


def test_what_the_cli_may_do(secured):
    """Requests, discovery, the sessions bucket and the audit stream (read): what its commands use."""
    server, seeds = secured
    errors: list[str] = []

    async def allowed(nc):
        await _as(server.url, seeds["enforcer"], lambda enf: _put(enf, names.SESSIONS_BUCKET, "s1"))
        js = nc.jetstream()
        kv = await js.key_value(names.SESSIONS_BUCKET)
        assert (await kv.get("s1")).value == b"v"
        # What `sessions ls` does (a watch checked against the newest message).
        seen = list(await kv_read.snapshot(js, await kv_read.open_bucket(js, names.SESSIONS_BUCKET)))
        sub = await nc.jetstream().subscribe(names.AUDIT_SUBJECTS, stream=names.AUDIT_STREAM, ordered_consumer=True)
        await sub.unsubscribe()
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        await nc.flush()
        await replies.unsubscribe()
        return seen

    assert asyncio.run(_as(server.url, seeds["cli"], allowed, errors)) == ["s1"]
    assert errors == []


async def _put(nc, bucket: str, key: str) -> None:
    kv = await nc.jetstream().key_value(bucket)
    await kv.put(key, b"v")


def test_enforcer_cannot_write_the_policy_or_locks_bucket(secured):
    server, seeds = secured
    errors: list[str] = []

    async def attempt(nc):
        results = {
            "policy": await _try_publish(nc, f"$KV.{names.POLICY_BUCKET}.{names.NETWORK_RESTRICTIONS_KEY}"),
            "locks": await _try_publish(nc, f"$KV.{names.LOCKS_BUCKET}.x"),
        }
        for verb in ("PURGE", "MSG.DELETE", "UPDATE", "DELETE"):
            try:
                await nc.request(f"$JS.API.STREAM.{verb}.KV_{names.POLICY_BUCKET}", b"{}", timeout=1.0)
                results[verb] = "answered"
            except NatsTimeout:
                results[verb] = "no answer"
        # What it needs still works: its own buckets, audit events, reading policy.
        results["sessions"] = await _try_publish(nc, f"$KV.{names.SESSIONS_BUCKET}.x")
        results["leases"] = await _try_publish(nc, f"$KV.{names.LEASES_BUCKET}.x")
        results["event"] = await _try_publish(nc, names.audit_subject("n1", "session.start"))
        kv = await nc.jetstream().key_value(names.POLICY_BUCKET)
        try:
            await kv.get(names.NETWORK_RESTRICTIONS_KEY)
        except KeyNotFoundError:
            results["read"] = "readable"
        return results

    results = asyncio.run(_as(server.url, seeds["enforcer"], attempt, errors))
    assert results == {"policy": "no ack", "locks": "no ack", "PURGE": "no answer", "MSG.DELETE": "no answer",
                       "UPDATE": "no answer", "DELETE": "no answer", "sessions": "stored", "leases": "stored",
                       "event": "stored", "read": "readable"}, results
    assert any(f"$kv.{names.POLICY_BUCKET}" in e.lower() for e in errors), errors

    # The policy service's credential writes the policy bucket; the locks service's does not.
    assert asyncio.run(_as(server.url, seeds["policy"],
                           lambda nc: _try_publish(nc, f"$KV.{names.POLICY_BUCKET}.x"))) == "stored"
    assert asyncio.run(_as(server.url, seeds["locks"],
                           lambda nc: _try_publish(nc, f"$KV.{names.POLICY_BUCKET}.y"))) == "no ack"
    assert asyncio.run(_as(server.url, seeds["locks"],
                           lambda nc: _try_publish(nc, f"$KV.{names.LOCKS_BUCKET}.y"))) == "stored"


def test_the_web_console_reads_but_writes_nothing_and_answers_only_its_own_api(secured):
    """The console's credential: requests, the policy and sessions buckets and the audit stream to read,
    its own sign-in API; no audit events, recordings, bucket writes or stream changes, no other API."""
    server, seeds = secured
    errors: list[str] = []

    async def attempts(nc):
        await _as(server.url, seeds["enforcer"], lambda enf: _put(enf, names.SESSIONS_BUCKET, "s1"))
        await _as(server.url, seeds["policy"], lambda pol: _put(pol, names.POLICY_BUCKET, names.user_key("a")))
        js = nc.jetstream()
        reads = {
            "sessions": list(await kv_read.snapshot(js, await kv_read.open_bucket(js, names.SESSIONS_BUCKET))),
            "policy": (await kv_read.get(await kv_read.open_bucket(js, names.POLICY_BUCKET), names.user_key("a"))
                       ).value,
        }
        tail = await js.subscribe(names.AUDIT_SUBJECTS, stream=names.AUDIT_STREAM, ordered_consumer=True)
        await tail.unsubscribe()
        own = await nc.subscribe(f"{names.WEB_API}.x.login")
        await own.unsubscribe()
        writes = dict(zip(["audit", "recording", "policy", "locks", "sessions"], await asyncio.gather(
            _try_publish(nc, names.audit_subject("n1", "lock.created")),
            _try_publish(nc, names.recording_subject("n1", str(uuid.uuid4()))),
            _try_publish(nc, f"$KV.{names.POLICY_BUCKET}.{names.role_key('admin')}"),
            _try_publish(nc, f"$KV.{names.LOCKS_BUCKET}.x"),
            _try_publish(nc, f"$KV.{names.SESSIONS_BUCKET}.x")), strict=True))
        try:
            await nc.request(f"$JS.API.STREAM.PURGE.KV_{names.POLICY_BUCKET}", b"", timeout=1.0)
            writes["purge"] = "answered"
        except NatsTimeout:
            writes["purge"] = "no answer"
        sub = await nc.subscribe("ringfence.api.locks.lock")  # answering (or reading) another service's requests
        await nc.flush()
        await asyncio.sleep(0.3)
        await sub.unsubscribe()
        return reads, writes

    reads, writes = asyncio.run(_as(server.url, seeds["web"], attempts, errors))
    assert reads == {"sessions": ["s1"], "policy": b"v"}
    assert set(writes.values()) == {"no ack", "no answer"}, writes
    assert any('permissions violation for subscription to "ringfence.api.locks.lock"' in e for e in errors), errors
    assert not any("ringfence.api.web" in e or "RINGFENCE_AUDIT" in e for e in errors), errors


def test_only_the_owning_service_may_answer_its_api(secured):
    server, seeds = secured

    async def listen(nc, subject):
        try:
            sub = await nc.subscribe(subject)
            await nc.flush()
            await asyncio.sleep(0.3)  # the server's -ERR arrives asynchronously
            await sub.unsubscribe()
        except Exception as exc:
            return str(exc)
        return "ok"

    errors: list[str] = []
    asyncio.run(_as(server.url, seeds["cli"], lambda nc: listen(nc, "ringfence.api.locks.create"), errors))
    asyncio.run(_as(server.url, seeds["enforcer"], lambda nc: listen(nc, "ringfence.api.policy.>"), errors))
    assert len([e for e in errors if "permissions violation for subscription" in e]) == 2, errors


# --- `ringfence up` ------------------------------------------------------------------------------------------


@pytest.fixture
def nodename():
    name = f"up{uuid.uuid4().hex[:8]}"
    yield name
    uninstall(name, kill_sessions=True)


def _env(home: Path, nodename: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
    return {**env, "HOME": str(home), "RINGFENCE_NODENAME": nodename}


def test_up_secures_nats_bootstraps_the_admin_once_and_the_cli_works_with_both(tmp_path, nodename):
    data, home, port = tmp_path / "data", tmp_path / "home", free_port()
    home.mkdir()
    url = f"nats://127.0.0.1:{port}"
    env = _env(home, nodename)

    def cli(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*RINGFENCE, *args], cwd=ROOT, env={**env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=60, **kw)

    def up_once(log: Path) -> str:
        up = subprocess.Popen([*RINGFENCE, "up", "--data-dir", str(data), "--nats-port", str(port),
                               "--web-listen", "127.0.0.1:0"], cwd=ROOT,
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        try:
            try:
                wait_for(lambda: cli("status", "--data-dir", str(data), "--nats-url", url, "--wait", "0.5")
                         .returncode == 0, timeout=90, what="all four services under `ringfence up`")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log.read_text()[-5000:]}") from None
            # Root on the server node: cli.nk and admin.nk are found in the data dir.
            out = cli("lock", "--user", "mallory", "--message", "investigating", "--data-dir", str(data),
                      "--nats-url", url)
            assert out.returncode == 0, out.stderr + log.read_text()[-3000:]
            assert re.match(r'^Created a lock with name "[0-9a-f-]{36}"\.$', out.stdout.strip())
            # Without credentials (another data dir, nothing in env): refused by NATS, clearly.
            out = cli("status", "--nats-url", url, "--data-dir", str(tmp_path))
            assert out.returncode == 1
            assert "refused the connection with no credentials (authorization violation)" in out.stderr
            assert "--nats-nkey" in out.stderr
            # With the cli credential but no identity: NATS lets it in, the service refuses it.
            out = cli("get", "locks", "--nats-url", url, "--data-dir", str(tmp_path),
                      "--nats-nkey", str(data / "nats" / "cli.nk"))
            assert out.stderr.startswith("ERROR: request is not signed"), out.stderr
            # A session through the enforcer: its credential writes sessions and audit events. The
            # enforcer answers discovery (status) before its session socket opens (policy and locks loaded).
            wait_for(lambda: (data / "enforcer.sock").exists(), timeout=30, what="the enforcer's session socket")
            run = cli("run", "--data-dir", str(data), "--user", "demo", "--", "true")
            assert run.returncode == 0, run.stderr
            search = lambda: cli("events", "search", "--since", "10m", "--format", "json",  # noqa: E731
                                 "--data-dir", str(data), "--nats-url", url).stdout
            found = wait_for(lambda: "session.end" in search() and search(), timeout=30, what="session events")
            kinds = {json.loads(line)["event"] for line in found.splitlines() if line.strip()}
            assert {"role.created", "user.create", "lock.created", "session.start", "session.end"} <= kinds, kinds
        finally:
            up.terminate()
            up.wait(60)
        return log.read_text()

    first = up_once(tmp_path / "up1.log")
    admin = data / "admin.nk"
    assert f"bootstrap admin identity: {admin}" in first
    assert first.count("bootstrap admin identity") == 1
    assert stat.S_IMODE(os.stat(admin).st_mode) == 0o600
    assert read_identity(admin).user == "admin"
    for role in nats_security.ROLES:
        assert stat.S_IMODE(os.stat(data / "nats" / f"{role}.nk").st_mode) == 0o600
    assert "Violation" not in first, [line for line in first.splitlines() if "Violation" in line]
    conf = (data / "nats" / "nats-server.conf").read_text()
    assert "authorization" in conf
    for role in nats_security.ROLES:  # public keys only
        assert (data / "nats" / f"{role}.nk").read_text().strip() not in conf

    second = up_once(tmp_path / "up2.log")  # idempotent: same identity, nothing printed
    assert "bootstrap admin identity" not in second
    assert "Violation" not in second
    assert read_identity(admin).user == "admin"
