"""Several audit events in one JetStream message.

A producer with many events (the enforcer's kernel records: a port scan is
thousands of denials a second) publishes them in batches instead of one
message per event, on `names.audit_batch_subject(server_id)`
(`ringfence.audit.<node>.batch`: inside the audit stream's subjects and the
node's own, so the audit stream stores them and its durable consumer gets them).

The message:

- body: the events exactly as `events.encode_event` encodes them (what would
  be published alone), joined with b"\\n". Encoded JSON never contains a raw
  newline, so splitting on b"\\n" gives the events back byte for byte.
- header `Ringfence-Batch`: the number of events; a body that does not split
  into that many is not a batch (`decode_batch` raises BatchError).
- header `Nats-Msg-Id`: `batch_msg_id(lines)`: the same events re-sent from
  the same spool position (a lost ack) are dropped by the stream's duplicate
  window; a batch cut differently after a restart can repeat events, which the
  consumer drops by each event's uid as it does for single messages.

A consumer writes the events in order, each as if it had arrived alone on
`names.audit_subject(its event type)`. A batch holds at most MAX_BATCH_EVENTS
events and MAX_BATCH_BYTES bytes (below the stream's max message size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import msgspec

from . import names
from .streams import MAX_EVENT_BYTES

COUNT_HEADER = "Ringfence-Batch"
MAX_BATCH_EVENTS = 2048
MAX_BATCH_BYTES = MAX_EVENT_BYTES // 2


class BatchError(ValueError):
    """A message on the batch subject that is not a well-formed batch."""


def encode_batch(lines: list[bytes]) -> bytes:
    return b"\n".join(lines)


def batch_msg_id(lines: list[bytes]) -> str:
    """The message id of a batch: a digest of its events, the same for the same events."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(hashlib.sha256(line).digest())
    return f"batch-{len(lines)}-{digest.hexdigest()[:32]}"


def decode_batch(body: bytes, count: str | None) -> list[bytes]:
    """The encoded events of a batch, in order; BatchError when `count` (the
    Ringfence-Batch header) is missing or does not match the body."""
    try:
        expected = int(count or "")
    except ValueError:
        raise BatchError(f"{COUNT_HEADER} header {count!r} is not a number of events") from None
    lines = body.split(b"\n") if body else []
    if len(lines) != expected:
        raise BatchError(f"{COUNT_HEADER} says {expected} events but the body holds {len(lines)}")
    return lines


def split_batches(lines: Iterable[bytes], max_events: int = MAX_BATCH_EVENTS,
                  max_bytes: int = MAX_BATCH_BYTES) -> Iterator[list[bytes]]:
    """Consecutive batches within both limits, in order. A line longer than
    max_bytes goes alone (the stream judges it; see the enforcer's spool)."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        if batch and (len(batch) >= max_events or size + len(line) + 1 > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(line)
        size += len(line) + 1
    if batch:
        yield batch


def events_in(subject: str, headers: Mapping[str, str] | None, data: bytes) -> list[bytes]:
    """The encoded events a message of the audit stream carries: itself, or a batch's
    events (BatchError for a malformed batch). For every reader of the raw stream."""
    if names.audit_subject_parts(subject)[1] != names.AUDIT_BATCH:
        return [data]
    return decode_batch(data, (headers or {}).get(COUNT_HEADER))


class _Tag(msgspec.Struct):
    event: str = ""


_tag = msgspec.json.Decoder(_Tag)


def event_type(line: bytes) -> str:
    """The `event` field of an encoded event ("" when it has none or is not JSON)."""
    try:
        return _tag.decode(line).event
    except msgspec.DecodeError:
        return ""
