"""Pure decisions of the audit service: what to accept, ei numbering, search validation.

No I/O here; tests/test_audit_core.py covers it table-driven.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from ringfence.contract import names
from ringfence.contract.api import MAX_SEARCH_LIMIT, ApiError, SearchRequest
from ringfence.contract.events import EVENT_TYPES, AuditEvent, decode_event
from ringfence.contract.streams import MAX_EVENT_BYTES
from ringfence.contract.strict import show

# --- accepting messages ------------------------------------------------------------------


class Rejected(Exception):
    """A message that is not an event we can write; str() is the reason."""


class _UidProbe(msgspec.Struct):
    uid: str = ""


_probe = msgspec.json.Decoder(_UidProbe)


def decode_incoming(data: bytes, subject: str = "") -> AuditEvent:
    """Decode one message into an event, or raise Rejected saying why. With its `subject`:
    an event must name the node it was published by (a node's NATS credential publishes
    only under its own server_id, so it cannot pass for another node)."""
    if len(data) > MAX_EVENT_BYTES:
        raise Rejected(f"event is {len(data)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        event = decode_event(data)
    except msgspec.DecodeError as exc:  # includes ValidationError (unknown type, bad field)
        raise Rejected(f"not a valid audit event: {exc}") from None
    # The Struct fills a missing uid with a fresh one, which would defeat
    # de-duplication of redeliveries: the uid must come from the publisher.
    if not _probe.decode(data).uid:
        raise Rejected("event has no uid")
    if subject and names.audit_subject_parts(subject)[0] != event.server_id:
        raise Rejected(f'server_id "{event.server_id[:80]}" is not the node of the subject {subject[:200]}')
    return event


# --- time ----------------------------------------------------------------------------------

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch of an RFC 3339 time with an offset; ValueError otherwise."""
    try:
        when = dt.datetime.fromisoformat(text)
    except (ValueError, TypeError):
        raise ValueError(f"{show(text)} is not an RFC 3339 time (e.g. 2021-07-22T22:24:14Z)") from None
    if when.tzinfo is None:
        raise ValueError(f"{show(text)} is not an RFC 3339 time with a UTC offset (e.g. 2021-07-22T22:24:14Z)")
    return (when - _EPOCH) // _MS  # integer arithmetic: no float rounding of milliseconds


def event_time_ms(event: AuditEvent, fallback_ms: int) -> int:
    """Where an event sits in time for search: its own time, else when it was written."""
    try:
        return parse_time_ms(event.time)
    except ValueError:
        return fallback_ms


# --- stream order ----------------------------------------------------------------------------


def missing_sequences(expected: int | None, received: list[int], max_gap: int) -> list[int]:
    """Stream sequences to read from the stream before writing a batch of `received` ones.

    `expected` is the sequence after the last one written (None: unknown, e.g. a
    first start). A message skipped by the consumer (handed to a fetch that never
    arrived) is sent again only after ack_wait, after newer ones: every sequence
    from `expected` up to the newest received that was not received is missing.
    A gap wider than `max_gap` is not filled (the stream was replaced, or the
    position is from another one); those messages arrive when JetStream resends them."""
    seqs = sorted({s for s in received if s > 0})
    if expected is None or not seqs or seqs[-1] < expected:
        return []
    have = set(seqs)
    missing = [s for s in range(expected, seqs[-1]) if s not in have]
    return missing if len(missing) <= max_gap else []


# --- ei: index of the event within its session ---------------------------------------------


class SessionCounter:
    """Hands out ei per sid: 0, 1, 2, ... in write order; events without sid get 0.

    `last_ei(sid)` asks the index for the highest ei written for a sid (None
    when there is none), so numbering continues across restarts. Recent sids
    are cached; the cache is dropped when it grows past `max_cached`.
    """

    def __init__(self, last_ei: Callable[[str], int | None], max_cached: int = 100_000) -> None:
        self._last_ei = last_ei
        self._next: dict[str, int] = {}
        self._max_cached = max_cached

    def assign(self, sid: str) -> int:
        if not sid:
            return 0
        n = self._next.get(sid)
        if n is None:
            if len(self._next) >= self._max_cached:
                self._next.clear()
            last = self._last_ei(sid)
            n = 0 if last is None else last + 1
        self._next[sid] = n + 1
        return n

    def forget(self) -> None:
        """After a failed batch: re-derive everything from the index."""
        self._next.clear()


# --- search ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchQuery:
    start_ms: int | None
    end_ms: int | None
    event_types: tuple[str, ...]
    user: str
    sid: str
    limit: int
    descending: bool
    after: tuple[int, int] | None  # (time_ms, seq) of the last event of the previous page


def encode_key(time_ms: int, seq: int) -> str:
    return f"{time_ms}.{seq}"


_KEY = re.compile(r"(-?[0-9]{1,18})\.([0-9]{1,18})")  # within SQLite's 64-bit integers


def decode_key(key: str) -> tuple[int, int]:
    m = _KEY.fullmatch(key)
    if not m:
        raise ValueError(f"start_key: {show(key)} is not a key returned by a previous search")
    return int(m[1]), int(m[2])


def validate_search(req: SearchRequest) -> SearchQuery:
    """Check every field of a search request; ApiError(kind="invalid") names the value."""
    try:
        start = parse_time_ms(req.start) if req.start else None
    except ValueError as exc:
        raise ApiError(f"start: {exc}") from None
    try:
        end = parse_time_ms(req.end) if req.end else None
    except ValueError as exc:
        raise ApiError(f"end: {exc}") from None
    if start is not None and end is not None and end <= start:
        raise ApiError(f"end: {show(req.end)} is not after start {show(req.start)}")
    if not 1 <= req.limit <= MAX_SEARCH_LIMIT:
        raise ApiError(f"limit: {req.limit} is out of range (1 to {MAX_SEARCH_LIMIT})")
    for i, name in enumerate(req.event_types):
        if name not in EVENT_TYPES:
            known = ", ".join(sorted(EVENT_TYPES))
            raise ApiError(f"event_types[{i}]: {show(name)} is not an event type; known: {known}")
    if req.order not in ("asc", "desc"):
        raise ApiError(f"order: {show(req.order)} must be asc or desc")
    try:
        after = decode_key(req.start_key) if req.start_key else None
    except ValueError as exc:
        raise ApiError(str(exc)) from None
    return SearchQuery(
        start_ms=start,
        end_ms=end,
        event_types=tuple(dict.fromkeys(req.event_types)),
        user=req.user,
        sid=req.sid,
        limit=req.limit,
        descending=req.order == "desc",
        after=after,
    )


def take_page(rows: list[tuple[int, int, bytes]], limit: int, max_bytes: int) -> tuple[list[bytes], str]:
    """Cut (time_ms, seq, line) rows into one reply: at most `limit` events and about
    `max_bytes` of JSON (NATS refuses bigger messages). next_key is set when more remain."""
    lines: list[bytes] = []
    size = 0
    last_key = (0, 0)
    for time_ms, seq, line in rows[:limit]:
        if lines and size + len(line) + 1 > max_bytes:
            return lines, encode_key(*last_key)
        lines.append(line)
        size += len(line) + 1
        last_key = (time_ms, seq)
    if len(rows) > limit:
        return lines, encode_key(*last_key)
    return lines, ""


# --- dead letters -------------------------------------------------------------------------------

MAX_REJECTED_DATA = 64 * 1024  # bytes of a rejected message kept in rejected.log


class RejectedRecord(msgspec.Struct):
    time: str
    reason: str
    subject: str
    stream_seq: int
    size: int
    data: str  # the message as text (invalid UTF-8 replaced), cut at MAX_REJECTED_DATA
    truncated: bool = False


_reject_encoder = msgspec.json.Encoder()


def rejected_line(reason: str, subject: str, stream_seq: int, data: bytes, now: dt.datetime) -> bytes:
    record = RejectedRecord(
        time=now.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        reason=reason,
        subject=subject,
        stream_seq=stream_seq,
        size=len(data),
        data=data[:MAX_REJECTED_DATA].decode("utf-8", errors="replace"),
        truncated=len(data) > MAX_REJECTED_DATA,
    )
    return _reject_encoder.encode(record) + b"\n"
