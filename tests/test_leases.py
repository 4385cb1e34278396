"""max_connections leases kept per node (services/enforcer/leases.py): the order of the stream
decides who gets the last slot, and a node writes only its own keys."""

from __future__ import annotations

import asyncio

import nats
import pytest

from ringfence.contract import names
from ringfence.contract.streams import ensure_streams
from ringfence.runtime import kv_read
from services.enforcer.leases import ConnectionLeases, Lease, earlier_live
from tests.support.early_marker import EarlyMarkerBucket

NOW = 1000.0


@pytest.mark.parametrize(
    ("entries", "position", "expected"),
    [
        ([], 10, 0),
        ([(5, [Lease("a", "n1", NOW + 30)])], 10, 1),  # since 0: the entry's revision (5) counts
        ([(12, [Lease("a", "n1", NOW + 30)])], 10, 0),  # written after us
        ([(12, [Lease("a", "n1", NOW + 30, since=3)])], 10, 1),  # renewed after us, first stored before
        ([(5, [Lease("a", "n1", NOW - 1)])], 10, 0),  # expired
        ([(5, [Lease("me", "n1", NOW + 30)])], 10, 0),  # our own sid
        ([(5, [Lease("a", "n1", NOW + 30), Lease("b", "n1", NOW + 30, since=2)]),
          (7, [Lease("c", "n2", NOW + 30)]), (11, [Lease("d", "n3", NOW + 30)])], 10, 3),
    ],
)
def test_earlier_live_counts_live_leases_stored_before_ours(entries, position, expected):
    assert earlier_live(entries, position, NOW, "me") == expected


async def _nodes(conns: list) -> list[ConnectionLeases]:
    await ensure_streams(conns[0].jetstream())
    return [ConnectionLeases(await kv_read.open_bucket(nc.jetstream(), names.LEASES_BUCKET), f"node-{i}", 30,
                             nc.jetstream()) for i, nc in enumerate(conns)]


async def _racers(url: str, nodes: int, per_node: int, limit: int) -> tuple[int, list[ConnectionLeases]]:
    conns = [await nats.connect(url) for _ in range(nodes)]
    try:
        leases = await _nodes(conns)
        attempts = [lease.acquire("alice", f"s-{i}-{j}", limit, wait=0) for i, lease in enumerate(leases)
                    for j in range(per_node)]
        won = sum(await asyncio.gather(*attempts))
        # A slot given back is free again for anyone.
        first = next(sid for lease in leases for sid in lease.held)
        owner = next(lease for lease in leases if first in lease.held)
        await owner.release(first)
        again = await leases[-1].acquire("alice", "late", limit, wait=1.0)
        return won + again - 1, leases
    finally:
        for nc in conns:
            await nc.close()


def test_nodes_racing_for_the_last_slots_never_exceed_the_limit(nats_server):
    won, leases = asyncio.run(_racers(nats_server.url, nodes=3, per_node=4, limit=2))
    assert won == 2
    assert sum(len(lease.held) for lease in leases) == 2


def test_a_holder_renewing_while_the_last_slot_is_checked_still_counts(nats_server):
    """Steps in a chosen order: node-0 and node-1 hold the 2 slots; node-2 asks for a third while
    node-0 renews (rewrites its key) and the snapshot's watch says "caught up" before node-0's
    new entry, as nats-server's pending count places it then (tests/support/early_marker.py).
    Before: node-0's lease was missing from node-2's view, and 3 sessions held 2 slots."""

    async def main():
        conns = [await nats.connect(nats_server.url) for _ in range(3)]
        try:
            node0, node1, node2 = await _nodes(conns)
            assert await node0.acquire("alice", "first", 2, wait=0)
            assert await node1.acquire("alice", "second", 2, wait=0)
            node2.kv = EarlyMarkerBucket(node2.kv, names.lease_key("alice", "node-0"), node0.renew)
            assert not await node2.acquire("alice", "third", 2, wait=0)
            assert [list(n.held) for n in (node0, node1, node2)] == [["first"], ["second"], []]
        finally:
            for nc in conns:
                await nc.close()

    asyncio.run(main())
