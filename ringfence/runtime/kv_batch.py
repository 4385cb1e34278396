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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from .retrying import LEADER_WAIT, retrying

log = logging.getLogger(__name__)

MAX_WRITES = 1000  # the server's limit on messages in one atomic batch
RETRY_PAUSE = 0.1
WRONG_LAST_SEQUENCE = 10071  # JetStream: an expected revision did not match

_BATCH_ID = "Nats-Batch-Id"
_BATCH_SEQUENCE = "Nats-Batch-Sequence"
_BATCH_COMMIT = "Nats-Batch-Commit"
_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
_KV_OPERATION = "KV-Operation"
EVENT_HEADER = "Ringfence-Audit-Event"  # base64 of the encoded event: a header value is one ASCII line


@dataclass(frozen=True)
class KvWrite:
    key: str
    value: bytes | None  # None deletes the key
    last: int | None = None  # only if the key is still at this revision (0: only if it has none)
    event: str | None = None  # the audit event this write carries (runtime/audit_outbox.py)


class WriteOutcomeUnknown(Exception):
    """The server did not confirm the commit in time: all of the batch was stored, or none of it."""


def unconfirmed_message(exc: Exception, bucket: str, check: str) -> str:
    """What to tell a requester whose write NATS did not confirm: nothing stored (no stream
    leader answered at all) or an unknown outcome; `check` is the command that shows which."""
    if isinstance(exc, (NoRespondersError, NoStreamResponseError)):
        return f"nothing was changed: no NATS server stored the {bucket} bucket's writes in time; try again"
    return f"NATS did not confirm the change ({exc}); it may or may not have been applied: check with {check}"


class BatchError(Exception):
    """The server refused the batch; nothing of it was stored."""

    def __init__(self, description: str, err_code: int = 0) -> None:
        super().__init__(description)
        self.err_code = err_code


_warned_not_atomic = False


async def write_all(nc: Client, bucket: str, writes: list[KvWrite], timeout: float = 5.0,
                    leader_wait: float = LEADER_WAIT) -> int:
    """Store every write or none; returns the stream sequence of the last one.

    Raises BatchError when the server refused the batch (an expected revision did not
    match, atomic publish not enabled, ...): then nothing was written. While the stream
    has no leader (nothing answers: nothing stored) the batch is sent again for up to
    `leader_wait` seconds. So is a batch whose commit was not confirmed in time (it went
    to a server that died) when none of its writes is conditional: writing the same
    values again is harmless. A conditional one raises WriteOutcomeUnknown then: all or
    nothing was stored, never a part."""
    if not writes:
        return 0
    if len(writes) > MAX_WRITES:
        raise ValueError(f"{len(writes)} writes; at most {MAX_WRITES} are applied together")
    return await while_leaderless(lambda: _write_once(nc, bucket, writes, timeout), leader_wait)


T = TypeVar("T")


async def while_leaderless(attempt: Callable[[], Awaitable[T]], leader_wait: float = LEADER_WAIT) -> T:
    """`attempt()`, made again while it fails because nothing answers the stream's subjects
    (no leader, e.g. during an election after a node died: such a try stored nothing),
    for up to `leader_wait` seconds."""
    try:
        return await retrying(attempt, retry_if=(NoRespondersError, NoStreamResponseError, _Unconfirmed),
                              deadline=leader_wait, pause=RETRY_PAUSE, what="no stream leader answers the write yet")
    except _Unconfirmed as exc:
        raise WriteOutcomeUnknown(str(exc)) from None


class _Unconfirmed(Exception):
    """No answer in time, and sending the batch again is safe: the first message of a
    multi-message batch (no commit was sent), or a commit whose writes are all unconditional."""


def _headers(w: KvWrite) -> dict[str, str]:
    """The headers nats-py's KeyValue gives such a write, plus the event it carries."""
    headers = {}
    if w.value is None:
        headers[_KV_OPERATION] = "DEL"
    if w.last is not None:
        headers[_EXPECTED_LAST_SUBJECT_SEQUENCE] = str(w.last)
    if w.event is not None:
        headers[EVENT_HEADER] = w.event
    return headers


async def write_one(js: JetStreamContext, bucket: str, write: KvWrite, timeout: float = 5.0) -> int:
    """One write, sent once; returns its stream sequence. Raises nats-py's errors: APIError
    with err_code WRONG_LAST_SEQUENCE when `write.last` did not match, NoStreamResponseError
    when no stream leader answered (nothing stored), TimeoutError (outcome unknown)."""
    ack = await js.publish(f"$KV.{bucket}.{write.key}", write.value or b"", timeout=timeout,
                           headers=_headers(write) or None)
    return ack.seq


async def _write_once(nc: Client, bucket: str, writes: list[KvWrite], timeout: float) -> int:
    batch_id = uuid.uuid4().hex
    for n, w in enumerate(writes, start=1):
        headers = {_BATCH_ID: batch_id, _BATCH_SEQUENCE: str(n), **_headers(w)}
        subject = f"$KV.{bucket}.{w.key}"
        data = w.value or b""
        if n == len(writes):
            headers[_BATCH_COMMIT] = "1"
            try:
                reply = await nc.request(subject, data, timeout=timeout, headers=headers)
            except NatsTimeoutError:
                message = f"NATS did not confirm the write within {timeout:.0f}s"
                if any(x.last is not None for x in writes):
                    raise WriteOutcomeUnknown(message) from None
                raise _Unconfirmed(message) from None
            ack = _parse(reply)
            if ack.get("batch") != batch_id or ack.get("count") != n:
                _not_atomic(bucket, ack)
            return int(ack.get("seq", 0))
        if n == 1:  # the server says at once when it will not take the batch
            try:
                _parse(await nc.request(subject, data, timeout=timeout, headers=headers))
            except NatsTimeoutError:
                raise _Unconfirmed(f"NATS did not answer the start of the batch within {timeout:.0f}s") from None
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
