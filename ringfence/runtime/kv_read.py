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
- `snapshot()`: the current entries under a filter from a watch, read until the
  watch has delivered the newest message the leader has under that filter, asked
  after the watch has delivered what it calls everything (and again after each
  catch-up). A watch that cannot be created or falls silent (its replica just
  died, the cluster is electing a leader) is taken again, within the same deadline.

The watch's own "caught up" marker (None) is not enough, even on one server:
nats-py places it where the server's pending count reaches 0, and that count runs
one short while a key is rewritten (the old message's removal is counted at once,
the new message a moment later). A key whose old value the watch had not reached
yet was then missing from the snapshot: 2-6 snapshots in 100 while other nodes
rewrote their keys, and max_connections let 3 or 4 sessions through for 2 slots.

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
CATCH_UP_WAIT = 1.0  # seconds a snapshot's watch may be silent while it owes entries; then a new watch


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
    """{key: entry} of every key under `key_filter` that has a value, as the bucket was at one
    moment after the call (so every write acknowledged before the call is in it).
    StaleSnapshotError when none could be taken in time.

    Why one moment: the watch delivers in stream order. Once it has delivered revision N and the
    leader, asked afterwards, has nothing newer than N under the filter, every key's current
    message (revision <= N) was in the stream when the watch passed it, so it was delivered and
    nothing after it; a key deleted has its delete marker delivered last."""
    bucket = kv._name
    stream, subject = f"KV_{bucket}", f"$KV.{bucket}.{key_filter}"

    async def attempt() -> dict[str, KeyValue.Entry]:
        # Deletes included: the newest message under the filter may be a delete marker. The
        # consumer goes SNAPSHOT_CONSUMER_TTL after we stop listening (nats-py's default: 5 min).
        watcher = await kv.watch(key_filter, inactive_threshold=SNAPSHOT_CONSUMER_TTL)
        found: dict[str, KeyValue.Entry] = {}
        try:
            newest = await _apply_until(watcher, found, 0, None)
            while (latest := await newest_seq(js, stream, subject)) > newest:
                newest = await _apply_until(watcher, found, newest, latest)
        finally:
            await watcher.stop()
        return found

    try:
        return await retrying(attempt, retry_if=(*_NOT_ANSWERING, _Behind), deadline=deadline, pause=RETRY_PAUSE)
    except (*_NOT_ANSWERING, _Behind) as exc:
        problem = str(exc) if isinstance(exc, _Behind) else repr(exc)
        raise StaleSnapshotError(f"no current view of bucket {bucket} within {deadline:.0f}s ({problem})") from None


class _Behind(Exception):
    """The watch stopped delivering before it reached the newest writes (its replica is behind or gone)."""


async def _apply_until(watcher: KeyValue.KeyWatcher, found: dict[str, KeyValue.Entry], newest: int,
                       wanted: int | None) -> int:
    """Apply the watch's entries to `found` until one at revision `wanted` or later (None: until
    the watch's "caught up" marker); the newest revision applied."""
    while wanted is None or newest < wanted:
        try:
            entry = await watcher.updates(timeout=CATCH_UP_WAIT)
        except NatsTimeoutError:
            target = "its caught-up marker" if wanted is None else f"revision {wanted}"
            raise _Behind(f"the watch delivered up to revision {newest}, not {target}, "
                          f"within {CATCH_UP_WAIT:.0f}s") from None
        if entry is None:  # caught up, by the server's pending count
            if wanted is None:
                return newest
            continue
        newest = max(newest, entry.revision or 0)
        if entry.operation in (KV_DEL, KV_PURGE):
            found.pop(entry.key, None)
        else:
            found[entry.key] = entry
    return newest
