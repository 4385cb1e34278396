"""KV watches that notice within seconds that their consumer is gone.

A KV watch is an ephemeral ordered consumer that lives on one NATS server. When
that server dies while our connection stays on another one (a cluster), nothing
tells the client: nats-py notices only when two idle heartbeats are missing, and
a KV watch asks for one every 5 s, so a watcher went deaf for 10-20 s after a
node died (measured: a put 0.5 s after the kill reached it 19 s later), and an
enforcer kept running sessions a new lock should have ended. Buckets opened
here ask for a heartbeat every HEARTBEAT seconds; after two are missing, nats-py
recreates the consumer on a live server, starting right after the last entry
delivered, so nothing is skipped.
"""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

HEARTBEAT = 1.0  # seconds; a deaf watch is replaced after about two of them


class _HeartbeatingJetStream:
    """The JetStream context, except that subscriptions (KeyValue.watch makes one) ask for
    idle heartbeats every `heartbeat` seconds."""

    def __init__(self, js: JetStreamContext, heartbeat: float) -> None:
        self._js = js
        self._heartbeat = heartbeat

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def subscribe(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("idle_heartbeat", self._heartbeat)
        return await self._js.subscribe(*args, **kwargs)


async def watchable_bucket(js: JetStreamContext, bucket: str, *, direct: bool | None = None,
                           heartbeat: float = HEARTBEAT) -> KeyValue:
    """The bucket, whose watches notice a dead consumer within about 2 x `heartbeat` seconds.
    `direct`: None keeps the bucket's own setting (direct gets); False sends gets to the
    stream leader (runtime/kv_read.py)."""
    kv = await js.key_value(bucket)  # BucketNotFoundError when it does not exist
    use_direct = kv._direct if direct is None else direct
    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.",
                    js=_HeartbeatingJetStream(js, heartbeat), direct=use_direct)  # type: ignore[arg-type]
