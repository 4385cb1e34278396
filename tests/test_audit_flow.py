"""The audit service as a real process against a real nats-server: publish, write, crash, recover."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import uuid

import msgspec
import nats

from ringfence.cli.status import discover
from ringfence.contract import names
from ringfence.contract.auditlog import daily_files, event_lines, verify_files
from ringfence.contract.events import Exec, SessionNetwork
from ringfence.contract.streams import ensure_streams
from ringfence.runtime.audit_publish import MSG_ID_HEADER, publish_event
from services.audit.adapter import consumer_config, instance_id
from tests.support.nats import TEST_NODE
from tests.support.procs import wait_for

# The event of the seed's Step 4, as the enforcer publishes it.
SEED_SAMPLE = {
    "event": "session.network",
    "uid": "dda39eb4-13e1-45fd-a039-35b4dca1fa51",
    "code": "T4002I",
    "time": "2021-07-22T22:24:14.984Z",
    "cluster_name": "teleport-quickstart",
    "user": "demo",
    "login": "demo",
    "sid": "c8e0b0d5-3994-4221-b701-c1ae17d871f1",
    "namespace": "default",
    "server_id": "4951c001-8dad-4e21-abb6-c03f69b72d2e",
    "server_hostname": "graviton-node",
    "pid": 319267,
    "cgroup_id": 10863,
    "program": "curl",
    "src_addr": "10.0.0.5",
    "dst_addr": "142.250.189.206",
    "dst_port": 80,
    "version": 4,
    "operation": 0,
    "action": 1,
}


def log_lines(data_dir) -> list[dict]:
    """Every event line of the log (anchors left out)."""
    return [msgspec.json.decode(x) for f in daily_files(data_dir / "log") for x in event_lines(f)]


def line_count(data_dir) -> int:
    return sum(len(event_lines(f)) for f in daily_files(data_dir / "log"))


async def publish(url: str, events) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for e in events:
            e.server_id = e.server_id or TEST_NODE
            await publish_event(js, e)
    finally:
        await nc.close()


async def publish_raw(url: str, items: list[tuple[str, bytes, str]]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for subject, data, msg_id in items:
            await js.publish(subject, data, headers={MSG_ID_HEADER: msg_id})
    finally:
        await nc.close()


def counters(url: str) -> dict[str, int]:
    async def ask():
        nc = await nats.connect(url)
        try:
            found = await discover(nc, "STATS", wait=0.5)
        finally:
            await nc.close()
        [audit] = [i for i in found if i["name"] == names.service_name("audit")]
        data: dict[str, int] = {}
        for ep in audit["endpoints"]:
            data.update(ep.get("data") or {})
        return data

    return asyncio.run(ask())


def restart(proc) -> None:
    """Start again and wait for this start's "ready" (the log file keeps the old one)."""
    seen = len(proc.output())
    proc.start()
    wait_for(lambda: "service ready" in proc.output()[seen:], 30, what=f"{proc.name} to be ready again")


def test_a_published_event_is_written_with_every_field_of_the_seed_sample(nats_server, data_dir, services):
    services("audit")
    asyncio.run(publish(nats_server.url, [msgspec.convert(SEED_SAMPLE, SessionNetwork)]))
    link = data_dir / "log" / "events.log"
    wait_for(lambda: line_count(data_dir) == 1, what="the event in events.log")

    [written] = [msgspec.json.decode(x) for x in event_lines(link)]
    assert {k: written[k] for k in SEED_SAMPLE} == SEED_SAMPLE
    assert written["ei"] == 0 and len(written["hash"]) == 64
    assert link.is_symlink() and os.readlink(link) == daily_files(data_dir / "log")[-1].name
    assert stat.S_IMODE(link.resolve().stat().st_mode) == 0o640
    assert stat.S_IMODE((data_dir / "log").stat().st_mode) == 0o750


def test_the_same_uid_under_another_message_id_is_written_once(nats_server, data_dir, services):
    services("audit")
    event = Exec(uid=str(uuid.uuid4()), command="ls", server_id=TEST_NODE)
    data = msgspec.json.encode(event)
    subject = names.audit_subject(TEST_NODE, "exec")
    # A different msg id gets past the stream's duplicate window: the writer must catch it.
    asyncio.run(publish_raw(nats_server.url, [(subject, data, event.uid), (subject, data, "another-id")]))
    asyncio.run(publish(nats_server.url, [Exec(command="after")]))
    wait_for(lambda: line_count(data_dir) >= 2, what="both events written")
    assert [e["command"] for e in log_lines(data_dir)] == ["ls", "after"]
    wait_for(lambda: counters(nats_server.url)["duplicates_skipped"] == 1, what="the duplicate to be counted")
    assert counters(nats_server.url)["written"] == 2


def test_garbage_is_dead_lettered_and_later_events_still_flow(nats_server, data_dir, services):
    services("audit")
    asyncio.run(
        publish_raw(
            nats_server.url,
            [
                (names.audit_subject(TEST_NODE, "session.network"), b"\x00\xffnot json", "g1"),
                (names.audit_subject(TEST_NODE, "session.teleport"), b'{"event":"session.teleport","uid":"x"}', "g2"),
            ],
        )
    )
    asyncio.run(publish(nats_server.url, [Exec(command="still flowing")]))
    wait_for(lambda: line_count(data_dir) == 1, what="the good event")
    assert log_lines(data_dir)[0]["command"] == "still flowing"
    rejected = [msgspec.json.decode(x) for x in (data_dir / "log" / "rejected.log").read_bytes().splitlines()]
    assert ["malformed" in r["reason"] for r in rejected] == [True, False]
    assert "session.teleport" in rejected[1]["reason"]
    assert counters(nats_server.url)["rejected"] == 2


async def _consumer_with_short_ack_wait(url: str, data_dir, seconds: float) -> None:
    """Create the service's durable consumer first, so a killed batch is redelivered within seconds."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        config = consumer_config(instance_id(data_dir))
        config.ack_wait = seconds
        await js.add_consumer(names.AUDIT_STREAM, config=config)
    finally:
        await nc.close()


def test_sigkill_mid_stream_writes_every_event_exactly_once(nats_server, data_dir, services):
    total, sessions = 2000, 7
    asyncio.run(_consumer_with_short_ack_wait(nats_server.url, data_dir, 2.0))
    [audit] = services("audit")
    events = [SessionNetwork(sid=f"session-{i % sessions}", dst_port=i) for i in range(total)]

    async def paced():
        # Spread over a few seconds so both kills land while events are still arriving.
        for start in range(0, total, 20):
            await publish(nats_server.url, events[start : start + 20])
            await asyncio.sleep(0.02)

    publisher = threading.Thread(target=lambda: asyncio.run(paced()))
    publisher.start()
    try:
        for threshold in (300, 1000):
            wait_for(lambda t=threshold: line_count(data_dir) >= t, 60, what=f"{threshold} lines")
            audit.kill()
            assert line_count(data_dir) < total, "the kill must land mid-stream"
            restart(audit)
    finally:
        publisher.join()
    wait_for(lambda: line_count(data_dir) >= total, 60, interval=0.2, what=f"all {total} events")
    asyncio.run(asyncio.sleep(3))  # longer than ack_wait: any redelivery would have landed

    written = log_lines(data_dir)
    assert len(written) == total
    assert sorted(e["uid"] for e in written) == sorted(e.uid for e in events)
    for s in range(sessions):
        eis = [e["ei"] for e in written if e["sid"] == f"session-{s}"]
        assert eis == list(range(len(eis)))
    result = verify_files(daily_files(data_dir / "log"))
    assert (result.verified, result.broken) == (total, None)
