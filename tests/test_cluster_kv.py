"""JetStream on a three-node cluster: what Ringfence's NATS plumbing does when a node dies,
and the bugs the cluster chaos test found, each pinned down on its own.

- ensure_streams raises replicas (never lowers them) and says when the server is no cluster;
- reads through runtime/kv_read.py see every acknowledged write (replicas answer late);
- a watch whose consumer lived on the dead node hears again within seconds (runtime/kv_watch.py);
- KV writes and audit publishes wait out the election of a dead leader's successor.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig
from nats.js.errors import NoStreamResponseError

from ringfence.contract import names
from ringfence.contract.events import LockCreated
from ringfence.contract.streams import (
    StreamSetupError,
    bucket_configs,
    ensure_streams,
    ensure_streams_ready,
    stream_configs,
)
from ringfence.runtime import kv_batch, kv_read
from ringfence.runtime.audit_publish import publish_event_retrying
from ringfence.runtime.kv_watch import watchable_bucket
from tests.support.nats import NatsCluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path):
    c = NatsCluster(tmp_path / "nats").start()
    yield c
    c.stop()


async def lead_from(nc, cluster: NatsCluster, stream: str, server: str) -> None:
    """Make `server` the leader of `stream` (a preferred leader step-down, nats-server 2.11+)."""
    for _ in range(20):
        if cluster.leaders().get(stream) == server:
            return
        body = b'{"placement": {"preferred": "%s"}}' % server.encode()
        await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=5)
        await asyncio.sleep(0.5)
    raise AssertionError(f"{server} did not become the leader of {stream}")


def test_ensure_streams_raises_replicas_to_the_setting_and_never_lowers_them(cluster):
    async def main():
        nc = await nats.connect(cluster.url.split(","))
        try:
            js = nc.jetstream()
            await ensure_streams_ready(js, 1)  # as services without nats_replicas created them
            await ensure_streams_ready(js, 3)
            wanted = [c.name for c in stream_configs()] + [f"KV_{b.bucket}" for b in bucket_configs()]
            for stream in wanted:
                assert (await js.stream_info(stream)).config.num_replicas == 3, stream
            policy = await js.stream_info(f"KV_{names.POLICY_BUCKET}")
            assert policy.config.allow_atomic  # kept through the replica change
            await ensure_streams(js, 1)  # a process with the old setting takes nothing away
            for stream in wanted:
                assert (await js.stream_info(stream)).config.num_replicas == 3, stream
        finally:
            await nc.close()

    asyncio.run(main())


def test_replicas_on_a_single_server_are_a_clear_error(nats_server):
    async def main():
        nc = await nats.connect(nats_server.url)
        try:
            with pytest.raises(StreamSetupError, match=r"nats_replicas is 3 but the NATS server is not a cluster"):
                await ensure_streams(nc.jetstream(), 3)
        finally:
            await nc.close()

    asyncio.run(main())


def test_reads_after_writes_see_them_on_a_replicated_bucket(cluster):
    """Before: about 1 in 25 watch snapshots taken right after a put lacked it (a replica
    behind the leader answered), so `lock` then `unlock` could find no lock."""

    async def main():
        writer = await nats.connect(cluster.nodes[0].url)
        reader = await nats.connect(cluster.nodes[1].url)
        try:
            await writer.jetstream().create_key_value(KeyValueConfig(bucket="raw", replicas=3, history=1))
            kv = await writer.jetstream().key_value("raw")
            mine = await kv_read.open_bucket(reader.jetstream(), "raw")
            for i in range(150):
                key = f"k{i}"
                await kv.put(key, b"v")
                assert (await kv_read.get(mine, key)) is not None, f"get missed write {i}"
                assert key in await kv_read.snapshot(reader.jetstream(), mine), f"snapshot missed write {i}"
                if i % 10 == 0:
                    await kv.delete(key)
                    assert key not in await kv_read.snapshot(reader.jetstream(), mine), f"saw deleted {i}"
        finally:
            await writer.close()
            await reader.close()

    asyncio.run(main())


def test_a_watch_whose_consumer_died_with_its_node_hears_again_within_seconds(cluster):
    """Before: nats-py noticed the dead consumer after two missing 5 s heartbeats (10 s at
    least); a put 0.5 s after the kill reached the watcher 19 s later. Now two missing 1 s
    heartbeats, plus the meta leader's election when the dead node held it (measured 2-6 s)."""

    async def main():
        watcher_nc = await nats.connect(cluster.nodes[0].url)
        writer_nc = await nats.connect([n.url for n in cluster.nodes[1:]])
        try:
            await writer_nc.jetstream().create_key_value(KeyValueConfig(bucket="w", replicas=3, history=1))
            kv = await writer_nc.jetstream().key_value("w")
            watched = await watchable_bucket(watcher_nc.jetstream(), "w")
            for _ in range(30):  # until the watch's consumer is on another node than our connection
                watcher = await watched.watch(">")
                assert await watcher.updates(timeout=5) is None  # empty bucket: the end-of-snapshot marker
                info = await watcher._sub.consumer_info()  # where this watch's consumer lives
                host = info.cluster.leader if info.cluster else ""
                if host and host != cluster.nodes[0].name:
                    break
                await watcher.stop()
            else:
                pytest.skip("the watch consumer was always placed on the node we are connected to")
            # The bucket's leader elsewhere, so the put is stored at once: what is timed is the watch.
            for _ in range(20):
                leader = (await writer_nc.jetstream().stream_info("KV_w")).cluster.leader
                if leader != host:
                    break
                await writer_nc.request("$JS.API.STREAM.LEADER.STEPDOWN.KV_w", b"", timeout=5)
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"the bucket's leader stayed on {host}")
            doomed = [n.name for n in cluster.nodes].index(host)
            cluster.nodes[doomed].kill()
            killed = time.monotonic()
            while True:  # the writer may have been connected to the dead node, or its KV lost a leader
                try:
                    await kv.put("after", b"kill")
                    break
                except (NoStreamResponseError, NatsTimeoutError):
                    await asyncio.sleep(0.1)
            while True:
                entry = await watcher.updates(timeout=15)
                if entry is not None and entry.key == "after":
                    break
            heard = time.monotonic() - killed
            assert heard < 9, f"the watch heard the put {heard:.1f}s after the kill"
            await watcher.stop()
        finally:
            await watcher_nc.close()
            await writer_nc.close()

    asyncio.run(main())


def test_kv_writes_and_audit_publishes_wait_out_the_election_after_their_leader_died(cluster):
    """Before: a write or an audit publish in the ~5 s without a leader failed at once
    (no responders): `create -f` answered "internal error", and policy/locks dropped the
    audit event after three quick attempts."""

    async def main():
        nc = await nats.connect(cluster.url.split(","))
        try:
            js = nc.jetstream()
            await ensure_streams_ready(js, 3)
            doomed = cluster.nodes[2]
            await lead_from(nc, cluster, f"KV_{names.POLICY_BUCKET}", doomed.name)
            await lead_from(nc, cluster, names.AUDIT_STREAM, doomed.name)
            doomed.kill()
            started = time.monotonic()
            seq = await kv_batch.write_all(nc, names.POLICY_BUCKET, [kv_batch.KvWrite("k", b"v")])
            assert seq > 0
            written = time.monotonic() - started
            await publish_event_retrying(js, LockCreated(uid=str(uuid.uuid4()), name="x", server_id="node-1"))
            info = await js.stream_info(names.AUDIT_STREAM)
            assert info.state.messages == 1
            return written
        finally:
            await nc.close()

    written = asyncio.run(main())
    assert 1 < written < kv_batch.LEADER_WAIT + 1  # it did wait for the new leader
