"""Two audit services on two nodes of a three-node NATS cluster: each keeps the whole log
from its own durable consumer, byte for byte the same as the other's, with the same index;
search is answered by one of them with the same result; with one killed the other goes
on writing and answering, and the killed one catches up to the same bytes."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import uuid

import msgspec
import nats

from ringfence.contract import names
from ringfence.contract.api import ApiReply, SearchRequest, SearchResult
from ringfence.contract.auditlog import daily_files, event_lines
from ringfence.contract.batches import COUNT_HEADER, batch_msg_id, encode_batch
from ringfence.contract.events import LockCreated, SessionCommand, SessionNetwork, encode_event
from ringfence.runtime.audit_publish import MSG_ID_HEADER, publish_encoded
from tests.support.nats import TEST_NODE, NatsCluster
from tests.support.procs import ROOT, ServiceProcess, wait_for

REPLICAS = {"RINGFENCE_NATS_REPLICAS": "3"}


def events(tag: str, n: int) -> list:
    sids = [str(uuid.uuid4()) for _ in range(3)]
    made = []
    for i in range(n):
        kind = (SessionNetwork, SessionCommand, LockCreated)[i % 3]
        made.append(kind(sid=sids[i % 3] if kind is not LockCreated else "", user=f"{tag}-user{i % 4}",
                         server_id=TEST_NODE))
    return made


async def _publish(url: str, batch: list) -> None:
    """Half one event per message, half in batch messages (as the enforcer publishes kernel events)."""
    nc = await nats.connect(servers=url.split(","))
    try:
        js = nc.jetstream()
        lines = [encode_event(e) for e in batch]
        half = len(lines) // 2
        await publish_encoded(js, lines[:half])
        for i in range(half, len(lines), 50):
            chunk = lines[i : i + 50]
            await js.publish(names.audit_batch_subject(TEST_NODE), encode_batch(chunk),
                             headers={COUNT_HEADER: str(len(chunk)), MSG_ID_HEADER: batch_msg_id(chunk)}, timeout=20)
    finally:
        await nc.close()


def log_bytes(data_dir) -> list[tuple[str, bytes]]:
    return [(f.name, f.read_bytes()) for f in daily_files(data_dir / "log") if f.stat().st_size]


def count(data_dir) -> int:
    return sum(len(event_lines(f)) for f in daily_files(data_dir / "log"))


def complete(data_dir, n: int) -> bool:
    """`n` events in the log and in the index (lines reach the files a moment before the index)."""
    return count(data_dir) == n and len(index_rows(data_dir)) == n


def index_rows(data_dir) -> list[tuple]:
    with sqlite3.connect(f"file:{data_dir / 'log' / 'index.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT * FROM events ORDER BY loc").fetchall()


async def _search(url: str, req: SearchRequest, times: int) -> list[list[bytes]]:
    nc = await nats.connect(servers=url.split(","))
    try:
        answers = []
        for _ in range(times):
            msg = await nc.request(names.api_subject(names.AUDIT_API, "search"), msgspec.json.encode(req), timeout=20)
            reply = msgspec.json.decode(msg.data, type=ApiReply)
            assert reply.ok, reply.error
            answers.append([bytes(e) for e in msgspec.json.decode(reply.result, type=SearchResult).events])
        return answers
    finally:
        await nc.close()


def verify(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", "events", "verify", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=60, cwd=ROOT)


def assert_identical(a_dir, b_dir, total: int) -> None:
    assert count(a_dir) == count(b_dir) == total
    assert log_bytes(a_dir) == log_bytes(b_dir)
    assert index_rows(a_dir) == index_rows(b_dir)
    for d in (a_dir, b_dir):
        result = verify(d)
        assert (result.returncode, result.stdout.strip()) == (0, f"OK: {total} events verified"), result.stderr


def test_two_audit_services_keep_identical_logs_and_one_survives_the_other(tmp_path):
    cluster = NatsCluster(tmp_path / "nats").start()
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = ServiceProcess("audit", cluster.nodes[0].url, a_dir, env=REPLICAS)
    b = ServiceProcess("audit", cluster.nodes[1].url, b_dir, env=REPLICAS)
    try:
        a.start().wait_ready(60)
        b.start().wait_ready(60)
        first = events("one", 300)
        asyncio.run(_publish(cluster.url, first))
        wait_for(lambda: complete(a_dir, 300) and complete(b_dir, 300), 60, interval=0.2, what="both logs complete")
        assert_identical(a_dir, b_dir, 300)

        # Search is answered by one service or the other: always the same answer.
        request = SearchRequest(user="one-user1", order="desc", limit=40)
        answers = asyncio.run(_search(cluster.url, request, 12))
        assert len(answers[0]) == 40 and all(answer == answers[0] for answer in answers)

        a.kill()  # the other keeps writing and answering
        second = events("two", 300)
        asyncio.run(_publish(cluster.url, second))
        wait_for(lambda: complete(b_dir, 600), 60, interval=0.2, what="the survivor to write everything")
        [everything] = asyncio.run(_search(cluster.url, SearchRequest(limit=1000), 1))
        assert sorted(msgspec.json.decode(line)["uid"] for line in everything) == sorted(
            e.uid for e in first + second)

        a.start().wait_ready(60)  # catches up from its own consumer
        wait_for(lambda: complete(a_dir, 600), 60, interval=0.2, what="the restarted service to catch up")
        assert_identical(a_dir, b_dir, 600)
    finally:
        a.stop()
        b.stop()
        cluster.stop()
