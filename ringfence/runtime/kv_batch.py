"""Writing several keys of a KV bucket as one: all of them or none.

A request that changes several keys (`create -f` with several documents, `unlock`)
must never leave only some of them written, even when its service is killed between
two writes. JetStream's atomic batch publish (ADR-50, nats-server 2.12+) gives that:
the messages of a batch are held by the server and stored together when the last one
(the commit) arrives; a batch whose commit never comes is dropped. The bucket's stream
needs `allow_atomic` (contract/streams.py sets it). A key's KV subject is
`$KV.<bucket>.<key>`; a delete is a message with `KV-Operation: DEL`, as nats-py's
KeyValue writes them, so watchers see the same entries either way.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

from nats.aio.client import Client

log = logging.getLogger(__name__)

MAX_WRITES = 1000  # the server's limit on messages in one atomic batch
WRONG_LAST_SEQUENCE = 10071  # JetStream: an expected revision did not match

_BATCH_ID = "Nats-Batch-Id"
_BATCH_SEQUENCE = "Nats-Batch-Sequence"
_BATCH_COMMIT = "Nats-Batch-Commit"
_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
_KV_OPERATION = "KV-Operation"


@dataclass(frozen=True)
class KvWrite:
    key: str
    value: bytes | None  # None deletes the key
    last: int | None = None  # only if the key is still at this revision (0: only if it has none)


class BatchError(Exception):
    """The server refused the batch; nothing of it was stored."""

    def __init__(self, description: str, err_code: int = 0) -> None:
        super().__init__(description)
        self.err_code = err_code


_warned_not_atomic = False


async def write_all(nc: Client, bucket: str, writes: list[KvWrite], timeout: float = 5.0) -> int:
    """Store every write or none; returns the stream sequence of the last one.

    Raises BatchError when the server refused the batch (an expected revision did not
    match, atomic publish not enabled, ...): then nothing was written. A NATS timeout
    on the commit leaves the outcome unknown (all or nothing, never a part)."""
    if not writes:
        return 0
    if len(writes) > MAX_WRITES:
        raise ValueError(f"{len(writes)} writes; at most {MAX_WRITES} are applied together")
    batch_id = uuid.uuid4().hex
    for n, w in enumerate(writes, start=1):
        headers = {_BATCH_ID: batch_id, _BATCH_SEQUENCE: str(n)}
        if w.value is None:
            headers[_KV_OPERATION] = "DEL"
        if w.last is not None:
            headers[_EXPECTED_LAST_SUBJECT_SEQUENCE] = str(w.last)
        subject = f"$KV.{bucket}.{w.key}"
        data = w.value or b""
        if n == len(writes):
            headers[_BATCH_COMMIT] = "1"
            ack = _parse(await nc.request(subject, data, timeout=timeout, headers=headers))
            if ack.get("batch") != batch_id or ack.get("count") != n:
                _not_atomic(bucket, ack)
            return int(ack.get("seq", 0))
        if n == 1:  # the server says at once when it will not take the batch
            _parse(await nc.request(subject, data, timeout=timeout, headers=headers))
        else:
            await nc.publish(subject, data, headers=headers)
    raise AssertionError("unreachable")


def _parse(msg) -> dict:
    if not msg.data:
        return {}  # flow-control acknowledgement of a message inside the batch
    try:
        ack = json.loads(msg.data)
    except ValueError:
        raise BatchError(f"unexpected reply to a batch write: {msg.data[:200]!r}") from None
    error = ack.get("error")
    if error:
        raise BatchError(str(error.get("description", error)), int(error.get("err_code", 0)))
    return ack


def _not_atomic(bucket: str, ack: dict) -> None:
    """An older nats-server ignores the batch headers and stores each message as it comes."""
    global _warned_not_atomic
    if not _warned_not_atomic:
        _warned_not_atomic = True
        log.error("nats-server stored a batch of %s writes one by one (reply %s): it predates atomic batch "
                  "publish (2.12); a service killed mid-request can leave part of a request applied", bucket, ack)
