"""Pure decisions of the audit service: what to accept, ei numbering, search validation.

No I/O here; tests/test_audit_core.py covers it table-driven.
"""

from __future__ import annotations

import datetime as dt
import re
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


class _Probe(msgspec.Struct):
    uid: str = ""
    time: str = ""


_probe = msgspec.json.Decoder(_Probe)
_encode = msgspec.json.Encoder().encode


def _sent(data: bytes, key: bytes, value: str, field: str) -> bool:
    return bool(value) and (key + _encode(value) in data or bool(getattr(_probe.decode(data), field)))


def decode_incoming(data: bytes, subject: str = "") -> tuple[AuditEvent, int]:
    """Decode one event into (event, its time in ms since the epoch), or raise Rejected saying
    why. With the `subject` of its message (a batch's for each of its events): an event must
    name the node it was published by (a node's NATS credential publishes only under its own
    server_id, so it cannot pass for another node)."""
    if len(data) > MAX_EVENT_BYTES:
        raise Rejected(f"event is {len(data)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        event = decode_event(data)
    except msgspec.DecodeError as exc:  # includes ValidationError (unknown type, bad field)
        raise Rejected(f"not a valid audit event: {exc}") from None
    # The Struct fills a missing uid or time with a fresh one, which would defeat the
    # recognition of redeliveries (by uid and time): both must come from the publisher.
    # (Finding them as msgspec encodes them is the quick check; the probe decides otherwise.)
    if not _sent(data, b'"uid":', event.uid, "uid"):
        raise Rejected("event has no uid")
    if not _sent(data, b'"time":', event.time, "time"):
        raise Rejected("event has no time")
    if subject and names.audit_subject_parts(subject)[0] != event.server_id:
        raise Rejected(f'server_id "{event.server_id[:80]}" is not the node of the subject {subject[:200]}')
    try:
        # Searched by, and part of how a redelivery is recognised: it must be a time.
        return event, parse_time_ms(event.time)
    except ValueError as exc:
        raise Rejected(f"time: {exc}") from None


# --- time ----------------------------------------------------------------------------------

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


_second_cache: dict[str, int] = {}


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch of an RFC 3339 time with an offset; ValueError otherwise."""
    # Every event's time is parsed: the form events.now_rfc3339 writes takes a short cut.
    if len(text) == 24 and text[19] == "." and text[23] == "Z" and text[20:23].isdigit():
        second = _second_cache.get(text[:19])
        if second is None:
            if len(_second_cache) > 4096:
                _second_cache.clear()
            second = _second_cache[text[:19]] = _parse_time_ms(text) - int(text[20:23])
        return second + int(text[20:23])
    return _parse_time_ms(text)


def _parse_time_ms(text: str) -> int:
    try:
        when = dt.datetime.fromisoformat(text)
    except (ValueError, TypeError):
        raise ValueError(f"{show(text)} is not an RFC 3339 time (e.g. 2021-07-22T22:24:14Z)") from None
    if when.tzinfo is None:
        raise ValueError(f"{show(text)} is not an RFC 3339 time with a UTC offset (e.g. 2021-07-22T22:24:14Z)")
    return (when - _EPOCH) // _MS  # integer arithmetic: no float rounding of milliseconds


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
    after: tuple[int, int] | None  # (time_ms, loc) of the last event of the previous page


def encode_key(time_ms: int, loc: int) -> str:
    return f"{time_ms}.{loc}"


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


@dataclass(frozen=True)
class SearchIds:
    """The index's ids for a query's names (services/audit/index.py looks them up)."""

    user: int | None = None
    sid: int | None = None
    types: tuple[int, ...] = ()


def search_sql(q: SearchQuery, ids: SearchIds) -> tuple[str, dict[str, object]]:
    """The SELECT of (time_ms, loc) rows for `q`, limit + 1 of them.

    Each filter has an index that returns its rows in time order and holds all it returns
    (index.py: the rowid is where the line is), named with
    INDEXED BY so that a LIMIT never turns into a scan of everything: SQLite, left alone,
    may walk the time index and filter, which is fast for a common user and reads the
    whole table for a rare one. Several types are one ordered sub-query each, merged."""
    params: dict[str, object] = {"limit": q.limit + 1}
    conditions: list[str] = []
    if q.start_ms is not None:
        conditions.append("time_ms >= :start")
        params["start"] = q.start_ms
    if q.end_ms is not None:
        conditions.append("time_ms < :end")
        params["end"] = q.end_ms
    if q.after is not None:
        params["after_time"], params["after_loc"] = q.after
        if q.descending:
            conditions.append("time_ms <= :after_time AND (time_ms < :after_time OR loc < :after_loc)")
        else:
            conditions.append("time_ms >= :after_time AND (time_ms > :after_time OR loc > :after_loc)")
    if ids.user is not None:
        conditions.append("user = :user")
        params["user"] = ids.user
    if ids.sid is not None:
        conditions.append("sid = :sid")
        params["sid"] = ids.sid
    order = "DESC" if q.descending else "ASC"
    tail = f"ORDER BY time_ms {order}, loc {order} LIMIT :limit"

    def select(index: str, extra: list[str]) -> str:
        where = " AND ".join(conditions + extra)
        return f"SELECT time_ms, loc FROM events INDEXED BY {index}" + (f" WHERE {where}" if where else "")

    if ids.sid is not None or not ids.types:
        extra = []
        if ids.types:
            extra.append(f"type IN ({','.join(str(t) for t in ids.types)})")
        index = ("events_by_sid" if ids.sid is not None else "events_by_user" if ids.user is not None
                 else "events_by_time")
        return f"{select(index, extra)} {tail}", params
    index = "events_by_user_type" if ids.user is not None else "events_by_type"
    parts = [f"SELECT * FROM ({select(index, [f'type = {t}'])} {tail})" for t in ids.types]
    if len(parts) == 1:
        return parts[0], params
    return " UNION ALL ".join(parts) + f" {tail}", params


def take_page(rows: list[tuple[int, int, bytes]], limit: int, max_bytes: int) -> tuple[list[bytes], str]:
    """Cut (time_ms, loc, line) rows into one reply: at most `limit` events and about
    `max_bytes` of JSON (NATS refuses bigger messages). next_key is set when more remain."""
    lines: list[bytes] = []
    size = 0
    last_key = (0, 0)
    for time_ms, loc, line in rows[:limit]:
        if lines and size + len(line) + 1 > max_bytes:
            return lines, encode_key(*last_key)
        lines.append(line)
        size += len(line) + 1
        last_key = (time_ms, loc)
    if len(rows) > limit:
        return lines, encode_key(*last_key)
    return lines, ""


# --- retention -------------------------------------------------------------------------------


def retention_cutoff(now: dt.datetime, retention_seconds: float) -> dt.date | None:
    """The oldest UTC day to keep: a daily file goes once its whole day is older than the
    retention (so nothing is removed before it is that old). None: keep everything."""
    if retention_seconds <= 0:
        return None
    return (now - dt.timedelta(seconds=retention_seconds)).astimezone(dt.UTC).date()


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
