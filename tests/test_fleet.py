"""Fleet membership with two "hosts" on one machine (each its own data dir, host UUID and NATS
credential): joining with a token, what one node's credential can and cannot do, and removing
a node, against a nats-server configured as `ringfence up` configures it (auth callout to the
policy service) and real service processes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import nats
import pytest
import yaml
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout

from ringfence.config import ENV_NATS_SYSTEM_NKEY, ENV_NODE_AUTH_ISSUER
from ringfence.contract import fleet, names
from ringfence.contract.api import ApiReply
from ringfence.contract.events import SessionStart, encode_event
from ringfence.contract.streams import ensure_streams
from ringfence.runtime import kv_read, nats_security
from tests.support.nats import NatsServer, free_port
from tests.support.procs import ROOT, ServiceProcess, wait_for

RINGFENCE = [sys.executable, "-m", "ringfence.cli.main"]


class Plane:
    """A control plane: secured NATS, the policy (callout) and audit services, the cli credential."""

    def __init__(self, tmp: Path) -> None:
        creds = tmp / "creds"
        publics = nats_security.ensure_credentials(creds)
        self.seeds = {role: str(nats_security.seed_path(creds, role)) for role in publics}
        self.server = NatsServer(tmp / "nats", extra_conf=nats_security.authorization_block(publics)).start()
        self.url = self.server.url
        asyncio.run(_with(self.url, self.seeds["up"], lambda nc: ensure_streams(nc.jetstream())))
        self.dir = tmp / "control"
        env = {ENV_NODE_AUTH_ISSUER: self.seeds[nats_security.ISSUER],
               ENV_NATS_SYSTEM_NKEY: self.seeds[nats_security.SYSTEM]}
        self.services = [
            ServiceProcess("policy", self.url, self.dir, "--nats-nkey", self.seeds["policy"], env=env).start(),
            ServiceProcess("audit", self.url, self.dir, "--nats-nkey", self.seeds["audit"]).start(),
        ]
        for service in self.services:
            service.wait_ready()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
        return subprocess.run([*RINGFENCE, *args, "--nats-url", self.url, "--nats-nkey", self.seeds["cli"],
                               "--data-dir", str(self.dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def token(self, ttl: str = "1h") -> str:
        out = self.cli("tokens", "add", "--type", "node", "--ttl", ttl, "--format", "json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["token"]

    def join(self, data_dir: Path, nodename: str, token: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
        return subprocess.run([*RINGFENCE, "node", "join", "--token", token, "--nats-url", self.url,
                               "--data-dir", str(data_dir), "--nodename", nodename],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.server.stop()


@pytest.fixture
def plane(tmp_path):
    p = Plane(tmp_path)
    yield p
    p.stop()


async def _with(url: str, seed: str, action):
    nc = await nats.connect(url, nkeys_seed=seed, allow_reconnect=False, max_reconnect_attempts=1)
    try:
        return await action(nc)
    finally:
        await nc.close()


class Host:
    """A joined host as its enforcer sees it: its data dir, server id and NATS credential."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.config = yaml.safe_load((data_dir / "node.yaml").read_text())
        self.server_id = (data_dir / "host_uuid").read_text().strip()
        self.seed = self.config["nats_nkey"]

    async def connect(self, url: str, errors: list[str], **options) -> nats.NATS:
        async def on_error(exc):
            errors.append(str(exc))

        options.setdefault("allow_reconnect", False)
        return await nats.connect(url, nkeys_seed=self.seed, inbox_prefix=nats_security.node_inbox(self.server_id),
                                  error_cb=on_error, max_reconnect_attempts=1, **options)


@pytest.fixture
def two_hosts(plane, tmp_path):
    hosts = []
    for name in ("host-a", "host-b"):
        out = plane.join(tmp_path / name, name, plane.token())
        assert out.returncode == 0, out.stderr
        hosts.append(Host(tmp_path / name))
    return hosts


def test_a_token_joins_one_host_once_and_used_expired_or_removed_tokens_are_refused(plane, tmp_path):
    token = plane.token()
    out = plane.join(tmp_path / "a", "host-a", token)
    assert out.returncode == 0, out.stderr
    assert 'joined the fleet as node "host-a"' in out.stdout
    seed = tmp_path / "a" / "nats" / "node.nk"
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    host = Host(tmp_path / "a")
    assert host.config["nodename"] == "host-a" and host.config["nats_url"] == plane.url

    # The control plane knows the public key only: the seed is nowhere in its bucket.
    ls = plane.cli("nodes", "ls", "--format", "json")
    assert ls.returncode == 0, ls.stderr
    [node] = json.loads(ls.stdout)
    assert (node["name"], node["server_id"]) == ("host-a", host.server_id)
    policy_bucket = asyncio.run(_with(plane.url, plane.seeds["policy"], _bucket_dump))
    assert seed.read_text().strip() not in policy_bucket and token not in policy_bucket

    used = plane.join(tmp_path / "b", "host-b", token)
    assert used.returncode == 1
    assert "refused the join token: it is unknown, already used or expired" in used.stderr

    short = plane.token(ttl="1s")
    time.sleep(1.2)
    expired = plane.join(tmp_path / "b", "host-b", short)
    assert expired.returncode == 1 and "refused the join token" in expired.stderr

    removed = plane.token()
    listed = plane.cli("tokens", "ls", "--format", "json")
    [token_id] = [t["token_id"] for t in json.loads(listed.stdout)]  # the used and the expired one are gone
    assert removed not in listed.stdout
    assert plane.cli("tokens", "rm", token_id).returncode == 0
    assert plane.join(tmp_path / "b", "host-b", removed).returncode == 1

    # A name already in the fleet cannot be taken by another host.
    taken = plane.join(tmp_path / "c", "host-a", plane.token())
    assert taken.returncode == 1 and 'node "host-a" has already joined' in taken.stderr

    kinds = wait_for(lambda: _event_kinds(plane) >= {"join_token.create", "join_token.delete", "node.join"} and
                     _event_kinds(plane), what="fleet events in the audit log")
    assert "node.join" in kinds


async def _bucket_dump(nc) -> str:
    js = nc.jetstream()
    entries = await kv_read.snapshot(js, await kv_read.open_bucket(js, names.POLICY_BUCKET))
    return "\n".join(f"{key} {entry.value.decode(errors='replace')}" for key, entry in entries.items())


def _event_kinds(plane: Plane) -> set[str]:
    log = plane.dir / "log" / "events.log"
    return {json.loads(line)["event"] for line in log.read_text().splitlines()} if log.exists() else set()


async def _published(nc, subject: str, data: bytes = b"{}") -> str:
    try:
        await nc.jetstream().publish(subject, data, timeout=1.0)
        return "stored"
    except NatsTimeout:
        return "refused"


async def _kv_put(nc, bucket: str, key: str) -> str:
    return await _published(nc, f"$KV.{bucket}.{key}")


async def _answered(nc, subject: str) -> str:
    try:
        await nc.request(subject, b"{}", timeout=1.0)
        return "answered"
    except NatsTimeout:
        return "refused"


async def _subscribed(nc, subject: str, errors: list[str]) -> str:
    before = len(errors)
    sub = await nc.subscribe(subject)
    await nc.flush()
    await asyncio.sleep(0.3)  # the server's -ERR arrives asynchronously
    await sub.unsubscribe()
    return "refused" if any("permissions violation for subscription" in e for e in errors[before:]) else "allowed"


def test_a_node_credential_acts_only_as_its_own_node(plane, two_hosts):
    a, b = two_hosts
    user = names.encode_key_part("alice")
    errors: list[str] = []

    async def attempts(nc):
        own_event = encode_event(SessionStart(user="alice", server_id=a.server_id))
        forged = encode_event(SessionStart(user="alice", server_id=b.server_id))
        tries = {
            "own event": _published(nc, names.audit_subject(a.server_id, "session.start"), own_event),
            "event as b": _published(nc, names.audit_subject(b.server_id, "session.start"), forged),
            "b's server_id on a's subject": _published(nc, names.audit_subject(a.server_id, "session.start"), forged),
            "own recording": _published(nc, names.recording_subject(a.server_id, "s-1")),
            "recording as b": _published(nc, names.recording_subject(b.server_id, "s-1")),
            "own lease": _kv_put(nc, names.LEASES_BUCKET, f"conn.{user}.{a.server_id}"),
            "b's lease": _kv_put(nc, names.LEASES_BUCKET, f"conn.{user}.{b.server_id}"),
            "shared lease key": _kv_put(nc, names.LEASES_BUCKET, f"conn.{user}"),
            "own session": _kv_put(nc, names.SESSIONS_BUCKET, names.session_key(a.server_id, "s-1")),
            "b's session": _kv_put(nc, names.SESSIONS_BUCKET, names.session_key(b.server_id, "s-1")),
            "own status": _kv_put(nc, names.NODE_STATUS_BUCKET, a.server_id),
            "b's status": _kv_put(nc, names.NODE_STATUS_BUCKET, b.server_id),
            "policy": _kv_put(nc, names.POLICY_BUCKET, names.NETWORK_RESTRICTIONS_KEY),
            "locks": _kv_put(nc, names.LOCKS_BUCKET, str(uuid.uuid4())),
            **{f"{verb} {stream}": _answered(nc, f"$JS.API.STREAM.{verb}.{stream}")
               for verb in ("DELETE", "PURGE", "UPDATE")
               for stream in (names.AUDIT_STREAM, f"KV_{names.LEASES_BUCKET}", f"KV_{names.POLICY_BUCKET}")},
            "durable on audit": _answered(nc, f"$JS.API.CONSUMER.DURABLE.CREATE.{names.AUDIT_STREAM}.x"),
            "read audit": _answered(nc, f"$JS.API.CONSUMER.CREATE.{names.AUDIT_STREAM}"),
            "kill on b": _answered(nc, names.enforcer_subject(b.server_id, "kill")),
        }
        results = dict(zip(tries, await asyncio.gather(*tries.values()), strict=True))
        for name, subject in (("b's join frames", f"{names.JOIN_SUBJECT_PREFIX}.{b.server_id}.>"),
                              ("all join frames", f"{names.JOIN_SUBJECT_PREFIX}.>"),
                              ("everyone's replies", "_INBOX.>"), ("b's API", f"{names.ENFORCER_API}.{b.server_id}.>"),
                              ("own API", f"{names.ENFORCER_API}.{a.server_id}.kill")):
            results[name] = await _subscribed(nc, subject, errors)
        # What an enforcer needs: policy, locks and users readable.
        kv = await nc.jetstream().key_value(names.POLICY_BUCKET)
        results["read policy"] = "allowed" if (await kv.get(names.node_key("host-a"))).value else "?"
        return results

    async def run():
        nc = await a.connect(plane.url, errors)
        try:
            return await attempts(nc)
        finally:
            await nc.close()

    results = asyncio.run(run())
    allowed = {k for k, v in results.items() if v in ("stored", "allowed")}
    assert allowed == {"own event", "b's server_id on a's subject", "own recording", "own lease", "own session",
                       "own status", "own API", "read policy"}, results
    # The event naming b's server id was stored under a's subject; the audit service refuses to write it.
    wait_for(lambda: (plane.dir / "log" / "rejected.log").exists() or _rejected(plane), what="the forged event")
    written = [json.loads(x) for x in (plane.dir / "log" / "events.log").read_text().splitlines()]
    starts = [e for e in written if e["event"] == "session.start"]
    assert [e["server_id"] for e in starts] == [a.server_id]


def _rejected(plane: Plane) -> bool:
    return any("is not the node of the subject" in p.read_text(errors="replace")
               for p in (plane.dir / "log").glob("*rejected*"))


def test_removing_a_node_cuts_its_connection_within_a_second_and_it_cannot_return(plane, two_hosts):
    a, b = two_hosts
    errors: list[str] = []
    cut = asyncio.Event()

    async def run():
        async def on_disconnect():
            cut.set()

        nc = await a.connect(plane.url, errors, disconnected_cb=on_disconnect)
        other = await b.connect(plane.url, [])
        try:
            assert await _published(nc, names.audit_subject(a.server_id, "x")) == "stored"
            cli = await nats.connect(plane.url, nkeys_seed=plane.seeds["cli"])
            started = time.monotonic()
            reply = await cli.request(fleet.NODES_RM_SUBJECT, msgspec.json.encode(fleet.NodeRmRequest(name="host-a")),
                                      timeout=10)
            await asyncio.wait_for(cut.wait(), 2)
            elapsed = time.monotonic() - started
            await cli.close()
            assert await _published(other, names.audit_subject(b.server_id, "x")) == "stored"  # b is untouched
            answer = msgspec.json.decode(reply.data, type=ApiReply)
            assert answer.ok, answer.error
            return msgspec.json.decode(answer.result, type=fleet.NodeRemoved), elapsed
        finally:
            await nc.close()
            await other.close()

    removed, elapsed = asyncio.run(run())
    assert removed.connections_closed == 1 and removed.kicked
    assert elapsed < 1.0, f"cut off after {elapsed:.2f}s"
    with pytest.raises((NatsError, NoServersError), match=r"(?i)authorization"):
        asyncio.run(a.connect(plane.url, []))
    assert [n["name"] for n in json.loads(plane.cli("nodes", "ls", "--format", "json").stdout)] == ["host-b"]


def test_a_joined_node_runs_its_enforcer_with_its_own_credential_and_reports_status(plane, two_hosts):
    a, _ = two_hosts
    enforcer = ServiceProcess("enforcer", plane.url, a.dir, "--config", str(a.dir / "node.yaml"),
                              env={"RINGFENCE_SIMULATE_KERNEL": "1"}).start()
    try:
        enforcer.wait_ready()

        def listed():
            nodes = json.loads(plane.cli("nodes", "ls", "--format", "json").stdout)
            return next((n for n in nodes if n["name"] == "host-a" and n["last_seen"]), None)

        node = wait_for(listed, timeout=30, what="host-a's status in nodes ls")
        assert node["server_id"] == a.server_id and node["version"]
        assert node["lock_view_age_seconds"] >= 0
        text = plane.cli("nodes", "ls").stdout
        assert "host-a" in text and "host-b" in text and "never" in text  # b never reported
        assert "Violation" not in enforcer.output(), enforcer.output()[-3000:]
    finally:
        enforcer.stop()


# --- `ringfence up --listen` off loopback: TLS, pinned CA, join ---------------------------------------


def test_up_off_loopback_requires_tls_and_a_node_joins_with_the_pinned_ca(tmp_path):
    data, home = tmp_path / "data", tmp_path / "home"
    home.mkdir()
    port, metrics = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}, "HOME": str(home),
           "RINGFENCE_NODENAME": f"cp{uuid.uuid4().hex[:6]}"}
    log = tmp_path / "up.log"
    up = subprocess.Popen([*RINGFENCE, "up", "--data-dir", str(data), "--listen", f"0.0.0.0:{port}",
                           "--services", "policy,audit", "--metrics-listen", f"127.0.0.1:{metrics}",
                           "--web-listen", "off"],
                          cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*RINGFENCE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    url = f"tls://127.0.0.1:{port}"
    try:
        wait_for(lambda: "started policy, audit" in log.read_text(), timeout=60, what="up to start the services")
        wait_for(lambda: cli("tokens", "ls", "--data-dir", str(data), "--nats-url", url).returncode == 0,
                 timeout=30, what="the policy service to answer")
        text = log.read_text()
        assert "with TLS" in text and f"metrics of policy: http://127.0.0.1:{metrics}/metrics" in text
        assert f"metrics of audit: http://127.0.0.1:{metrics + 1}/metrics" in text

        # No TLS, no entry.
        with pytest.raises((NatsError, NoServersError, OSError)):
            asyncio.run(_with(f"nats://127.0.0.1:{port}", str(data / "nats" / "cli.nk"), lambda nc: nc.flush()))

        # Root on the control plane: the admin identity and the CA are found in the data dir.
        added = cli("tokens", "add", "--type", "node", "--ttl", "10m", "--data-dir", str(data), "--nats-url", url)
        assert added.returncode == 0, added.stderr
        token = added.stdout.split("The invite token: ")[1].split()[0]
        pin = added.stdout.split("--ca-pin=")[1].split()[0]

        wrong = cli("node", "join", "--token", token, "--nats-url", url, "--data-dir", str(tmp_path / "n0"),
                    "--ca-pin", "sha256:" + "0" * 64)
        assert wrong.returncode == 1 and "nothing was sent" in wrong.stderr

        joined = cli("node", "join", "--token", token, "--nats-url", url, "--data-dir", str(tmp_path / "n1"),
                     "--nodename", "remote-1", "--ca-pin", pin)
        assert joined.returncode == 0, joined.stderr
        config = yaml.safe_load((tmp_path / "n1" / "node.yaml").read_text())
        assert Path(config["nats_tls_ca"]).read_bytes() == (data / "tls" / "ca.pem").read_bytes()
        nodes = cli("nodes", "ls", "--format", "json", "--data-dir", str(data), "--nats-url", url)
        assert [n["name"] for n in json.loads(nodes.stdout)] == ["remote-1"]
        wait_for(lambda: {"join_token.create", "node.join"} <= _kinds(data), timeout=30, what="fleet events")
        [created] = [e for e in _events(data) if e["event"] == "join_token.create"]
        assert created["user"] == "admin" and token not in json.dumps(created)
    finally:
        up.terminate()
        up.wait(60)


def _events(data: Path) -> list[dict]:
    log = data / "log" / "events.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _kinds(data: Path) -> set[str]:
    return {e["event"] for e in _events(data)}
