"""Issue 7 fault: the policy or locks service is killed with SIGKILL in the middle of a
multi-document `create -f` and started again. Nothing is half-applied: afterwards
either every document of the request is stored or none is, and the client got either
an error or the full result."""

from __future__ import annotations

import asyncio
import collections
import signal

import msgspec
import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from ringfence.contract import api, names
from ringfence.runtime import kv_read
from tests.support.nats import audit_events
from tests.support.procs import wait_for

pytestmark = pytest.mark.timeout(180)

NO_AUTH = {"RINGFENCE_OPERATOR_AUTH": "off"}
DOCS = 300
# When the kill lands after the request is sent: before, while and after the service applies it.
DELAYS = (0.0, 0.03, 0.08, 0.15, 0.3, 0.6, 1.5)


def restart(proc) -> None:
    seen = len(proc.output())
    proc.start()
    wait_for(lambda: "service ready" in proc.output()[seen:], 30, what=f"{proc.name} to be ready again")


async def request_then_kill(url: str, subject: str, body: bytes, proc, delay: float) -> api.ApiReply | None:
    """Send the request; SIGKILL the service `delay` seconds later. The reply, or None when there was none."""
    nc = await nats.connect(url)
    try:
        # A reply comes before the kill or is in flight at it; a second covers the flight.
        pending = asyncio.ensure_future(nc.request(subject, body, timeout=delay + 1.0))
        await asyncio.sleep(delay)
        proc.proc.send_signal(signal.SIGKILL)
        try:
            msg = await pending
        except (NatsTimeout, NoRespondersError):
            return None
        return msgspec.json.decode(msg.data, type=api.ApiReply)
    finally:
        await nc.close()


async def stored_keys(url: str, bucket: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return set(await kv_read.snapshot(js, await kv_read.open_bucket(js, bucket)))
    finally:
        await nc.close()


def events_by_name(url: str, event_type: str) -> collections.Counter:
    return collections.Counter(e["name"] for e in audit_events(url, wait=None) if e["event"] == event_type)


def kill_mid_create(nats_url: str, proc, subject: str, bucket: str, document, key_of, event_type: str) -> None:
    outcomes = []
    for round_, delay in enumerate(DELAYS):
        docs = [document(f"r{round_}-{i}") for i in range(DOCS)]
        body = msgspec.json.encode(api.CreateRequest(resources=[msgspec.Raw(msgspec.json.encode(d)) for d in docs]))
        reply = asyncio.run(request_then_kill(nats_url, subject, body, proc, delay))
        proc.proc.wait(10)
        restart(proc)
        keys = {key_of(f"r{round_}-{i}") for i in range(DOCS)}
        present = keys & asyncio.run(stored_keys(nats_url, bucket))
        assert len(present) in (0, DOCS), f"round {round_} (kill after {delay}s): {len(present)} of {DOCS} applied"
        # Every change applied has its audit event exactly once, also when the kill came between
        # the write and the publish (the restarted service publishes what the write carried).
        recorded = {name: n for name, n in events_by_name(nats_url, event_type).items()
                    if name.startswith(f"r{round_}-")}
        assert recorded == ({f"r{round_}-{i}": 1 for i in range(DOCS)} if present else {}), (
            f"round {round_} (kill after {delay}s): {len(recorded)} events for {len(present)} changes")
        if reply is not None:
            if reply.ok:
                result = msgspec.json.decode(reply.result, type=api.CreateResult)
                assert len(result.messages) == DOCS
                assert len(present) == DOCS
            else:
                assert reply.error
        outcomes.append("applied" if present else "not applied")
    # The delays cover both outcomes, so the check above was not vacuous.
    assert set(outcomes) == {"applied", "not applied"}, outcomes


def test_policy_killed_mid_create_applies_all_documents_or_none(nats_server, services):
    [policy] = services("policy", env=NO_AUTH)
    kill_mid_create(
        nats_server.url, policy, names.api_subject(names.POLICY_API, "create"), names.POLICY_BUCKET,
        lambda name: {"kind": "role", "version": "v5", "metadata": {"name": name},
                      "spec": {"allow": {"logins": ["ubuntu"]}}},
        names.role_key, "role.created",
    )


def test_locks_killed_mid_create_applies_all_documents_or_none(nats_server, services):
    [locks] = services("locks", env=NO_AUTH)
    kill_mid_create(
        nats_server.url, locks, names.api_subject(names.LOCKS_API, "create"), names.LOCKS_BUCKET,
        lambda name: {"kind": "lock", "version": "v2", "metadata": {"name": name},
                      "spec": {"target": {"user": f"user-{name}"}, "message": "maintenance"}},
        lambda name: name, "lock.created",
    )


def test_kv_batch_writes_all_or_nothing(nats_server):
    """The mechanism under the tests above (ringfence/runtime/kv_batch.py) on a real server."""
    from ringfence.contract.streams import ensure_streams
    from ringfence.runtime import kv_batch

    async def scenario():
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            for bucket in (names.POLICY_BUCKET, names.LOCKS_BUCKET):
                assert (await js.stream_info(f"KV_{bucket}")).config.allow_atomic
            kv = await kv_read.open_bucket(js, names.LOCKS_BUCKET)
            rev = await kv.put("a", b"1")
            writes = [kv_batch.KvWrite(f"k{i}", b"v") for i in range(10)]
            # One stale expected revision: nothing of the batch is stored.
            with pytest.raises(kv_batch.BatchError) as info:
                await kv_batch.write_all(nc, names.LOCKS_BUCKET, [*writes, kv_batch.KvWrite("a", None, last=rev + 5)])
            assert info.value.err_code == kv_batch.WRONG_LAST_SEQUENCE
            assert set(await kv_read.snapshot(js, kv)) == {"a"}
            await kv_batch.write_all(nc, names.LOCKS_BUCKET, [*writes, kv_batch.KvWrite("a", None, last=rev)])
            assert set(await kv_read.snapshot(js, kv)) == {f"k{i}" for i in range(10)}
            with pytest.raises(ValueError):
                await kv_batch.write_all(nc, names.LOCKS_BUCKET, [kv_batch.KvWrite("x", b"")] * 1001)
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_a_change_written_without_its_event_gets_it_when_the_service_starts(nats_server, services):
    """What a service killed right after its write leaves: the change, carrying its event, and
    no event on the audit stream. The next start publishes it, once."""
    import base64

    from ringfence.contract.events import RoleCreated, encode_event
    from ringfence.contract.streams import ensure_streams
    from ringfence.runtime import kv_batch

    event = RoleCreated(name="orphan", user="alice", server_id="a-control-plane")  # stamped, as services do

    async def write_as_if_killed():
        nc = await nats.connect(nats_server.url)
        try:
            await ensure_streams(nc.jetstream())
            await kv_batch.write_all(nc, names.POLICY_BUCKET, [kv_batch.KvWrite(
                names.role_key("orphan"), b'{"kind":"role"}', event=base64.b64encode(encode_event(event)).decode())])
        finally:
            await nc.close()

    asyncio.run(write_as_if_killed())
    assert events_by_name(nats_server.url, "role.created") == {}
    [policy] = services("policy", env=NO_AUTH)
    assert "published 1 audit event(s) of policy changes written before the last stop" in policy.output()
    [stored] = [e for e in audit_events(nats_server.url, wait=None) if e["event"] == "role.created"]
    assert (stored["name"], stored["user"], stored["uid"]) == ("orphan", "alice", event.uid)
    # Published once: the cursor moved past it, so another start has nothing to publish.
    policy.stop()
    seen = len(policy.output())
    restart(policy)
    assert "audit event(s) of policy changes written before" not in policy.output()[seen:]
    assert events_by_name(nats_server.url, "role.created") == {"orphan": 1}
