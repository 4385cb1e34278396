"""ensure_streams() against a real JetStream: creates everything, idempotent, race-safe."""

from __future__ import annotations

import asyncio

import nats
from nats.js.errors import BucketNotFoundError

from ringfence.contract import names
from ringfence.contract.streams import ensure_streams


def test_ensure_streams_is_idempotent_and_safe_to_race(nats_server):
    async def main():
        clients = [await nats.connect(nats_server.url) for _ in range(4)]
        try:
            await asyncio.gather(*(ensure_streams(c.jetstream()) for c in clients))
            await ensure_streams(clients[0].jetstream())  # and once more, alone
            js = clients[0].jetstream()
            info = await js.stream_info(names.AUDIT_STREAM)
            assert names.AUDIT_SUBJECTS in info.config.subjects
            assert info.config.duplicate_window and info.config.duplicate_window >= 60
            for bucket in (names.POLICY_BUCKET, names.LOCKS_BUCKET, names.SESSIONS_BUCKET, names.LEASES_BUCKET):
                await js.key_value(bucket)
        finally:
            for c in clients:
                await c.close()

    asyncio.run(main())


def test_a_bucket_created_and_reconfigured_by_another_service_meanwhile_is_used(nats_server):
    """The interleaving CI hit: service A finds no bucket; B creates it and allows atomic
    batches (so its configuration differs from a fresh one); then A creates it."""

    async def main():
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)  # B, all the way

            class CheckedBeforeB:  # A's view: every bucket was missing when it looked
                def __getattr__(self, name):
                    return getattr(js, name)

                async def key_value(self, bucket):
                    raise BucketNotFoundError

            await ensure_streams(CheckedBeforeB())  # A: must not fail
            info = await js.stream_info(f"KV_{names.POLICY_BUCKET}")
            assert info.config.allow_atomic  # B's configuration stands
        finally:
            await nc.close()

    asyncio.run(main())
