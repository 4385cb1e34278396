"""Reads of a KV bucket that see every write made before them (read-after-write), on a cluster too.

On a JetStream cluster (nats_replicas 3 or 5) a KV get is a direct get that any
replica may answer, and a watch's consumer may be placed on any replica; a
follower that has not yet applied the newest writes answers with older data.
So `ringfence lock` followed at once by `ringfence unlock` could find no lock,
and `create -f` could call an existing role new. The services that own a bucket
read it through here:

- `open_bucket()`: a KeyValue whose gets the stream leader answers (the
  JetStream API's message get instead of a direct get); `get()` reads a key with
  it, waiting out a leader election;
- `snapshot()`: the current entries under a filter from a watch, checked against
  the newest message the leader has under that filter, and taken again until it
  includes it. A watch that cannot be created (its replica just died, the
  cluster is electing a leader) is retried too, within the same deadline.

With one server both are what nats-py does anyway, plus one request per snapshot.
"""

from __future__ import annotations

import logging

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .kv_watch import watchable_bucket
from .retrying import LEADER_WAIT, retrying

log = logging.getLogger(__name__)

SNAPSHOT_DEADLINE = LEADER_WAIT  # seconds: a leader election, within the CLI's request timeout
RETRY_PAUSE = 0.05
_NOT_ANSWERING = (NatsTimeoutError, TimeoutError, ServiceUnavailableError)  # no leader, or no replica yet
SNAPSHOT_CONSUMER_TTL = 10.0  # seconds


class StaleSnapshotError(Exception):
    """No current answer from the bucket within the deadline (no leader, or only stale replicas)."""


async def open_bucket(js: JetStreamContext, bucket: str) -> KeyValue:
    """The bucket, with gets answered by its stream leader (read-after-write) and watches
    that notice a dead consumer (runtime/kv_watch.py)."""
    return await watchable_bucket(js, bucket, direct=False)


async def get(kv: KeyValue, key: str, deadline: float = SNAPSHOT_DEADLINE) -> KeyValue.Entry | None:
    """The key's entry (None when it has no value), from a bucket opened with open_bucket();
    retried while the stream has no leader, within `deadline`."""
    async def attempt() -> KeyValue.Entry | None:
        try:
            return await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None

    try:
        return await retrying(attempt, retry_if=_NOT_ANSWERING, deadline=deadline, pause=RETRY_PAUSE)
    except _NOT_ANSWERING as exc:
        raise StaleSnapshotError(f"no answer for {kv._name}/{key} within {deadline:.0f}s ({exc!r})") from None


async def newest_seq(js: JetStreamContext, stream: str, subject: str) -> int:
    """The sequence of the newest message under `subject` (wildcards allowed) as the leader has it; 0: none."""
    try:
        msg = await js.get_msg(stream, subject=subject, direct=False)
    except NotFoundError:
        return 0
    return msg.seq or 0


async def snapshot(js: JetStreamContext, kv: KeyValue, key_filter: str = ">",
                   deadline: float = SNAPSHOT_DEADLINE) -> dict[str, KeyValue.Entry]:
    """{key: entry} of every key under `key_filter` that has a value now, including every
    write acknowledged before the call. StaleSnapshotError when none could be taken in time."""
    bucket = kv._name

    async def attempt() -> dict[str, KeyValue.Entry]:
        wanted = await newest_seq(js, f"KV_{bucket}", f"$KV.{bucket}.{key_filter}")
        found, newest = await _watch_once(kv, key_filter)
        if newest < wanted:
            raise _Behind(f"a replica answered up to revision {newest} of {wanted}")
        return found

    try:
        return await retrying(attempt, retry_if=(*_NOT_ANSWERING, _Behind), deadline=deadline, pause=RETRY_PAUSE)
    except (*_NOT_ANSWERING, _Behind) as exc:
        problem = str(exc) if isinstance(exc, _Behind) else repr(exc)
        raise StaleSnapshotError(f"no current view of bucket {bucket} within {deadline:.0f}s ({problem})") from None


class _Behind(Exception):
    """The watch was answered by a replica that has not applied the newest writes yet."""


async def _watch_once(kv: KeyValue, key_filter: str) -> tuple[dict[str, KeyValue.Entry], int]:
    # Deletes included: the newest message under the filter may be a delete marker. The
    # consumer goes SNAPSHOT_CONSUMER_TTL after we stop listening (nats-py's default: 5 min).
    watcher = await kv.watch(key_filter, inactive_threshold=SNAPSHOT_CONSUMER_TTL)
    found: dict[str, KeyValue.Entry] = {}
    newest = 0
    try:
        async for entry in watcher:
            if entry is None:  # caught up with what this replica has
                break
            newest = max(newest, entry.revision or 0)
            if entry.operation in (KV_DEL, KV_PURGE):
                found.pop(entry.key, None)
            else:
                found[entry.key] = entry
    finally:
        await watcher.stop()
    return found, newest
