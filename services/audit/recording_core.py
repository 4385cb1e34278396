"""Pure decisions for session recordings: what chunk to accept, in which order to
write chunks, how to page a .cast file. No I/O; tests/test_recordings_core.py.

Ordering (per sid): chunks are written strictly in seq order, each exactly once.
  - seq below the next expected one, or another message with a seq already held:
    a duplicate; acked, not written (a redelivery of a held message replaces it);
  - seq equal to it: written (and any held chunks that now follow);
  - seq above it (a gap): held in memory, unacked, until the gap fills. At most
    HOLD_MAX_CHUNKS per sid and HOLD_MAX_BYTES in all are held; a chunk beyond
    that is nak'd and comes back later. A gap still open after GAP_WAIT is
    given up on: the missing seqs are counted as lost (`recording_gaps_skipped`),
    writing continues at the lowest held seq, and a missing chunk that arrives
    later is acked as a duplicate. GAP_WAIT is well below the consumer's
    ack_wait, so held chunks are resolved before JetStream redelivers them; after
    a restart they are redelivered and held again.
  - A missing header (seq 0 never arrives, or has no header) is the same gap: the
    file then starts with a default header (80x24, time of the session start) so
    it stays valid asciicast v2; the log says so.
  - After the end chunk (end=True) nothing more is written for the sid; a later
    seq is dead-lettered.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import msgspec

from ringfence.contract import names, recording
from ringfence.contract.api import ApiError
from ringfence.contract.recording import (
    CastHeader,
    RecordingChunk,
    RecordingGetRequest,
    RecordingListRequest,
)

from .core import Rejected, parse_time_ms

GAP_WAIT = 10.0  # seconds a gap may stay open before the missing chunks are given up on
HOLD_MAX_CHUNKS = 256  # held (out-of-order) chunks per sid
HOLD_MAX_BYTES = 32 << 20  # held chunk bytes over all sids

# --- accepting chunks ------------------------------------------------------------------------


def decode_chunk(data: bytes, subject: str = "") -> RecordingChunk:
    """Decode and check one message; Rejected says why it is not a chunk we can store."""
    if len(data) > recording.MAX_CHUNK_BYTES:
        raise Rejected(f"chunk is {len(data)} bytes; the limit is {recording.MAX_CHUNK_BYTES}")
    try:
        chunk = recording.decode(data)
    except msgspec.DecodeError as exc:
        raise Rejected(f"not a valid recording chunk: {exc}") from None
    if not recording.is_valid_sid(chunk.sid):
        raise Rejected(f'sid: "{chunk.sid[:200]}" is not a valid session id')
    if subject and not _subject_matches(subject, chunk):
        raise Rejected(f'sid "{chunk.sid[:200]}" of node "{chunk.server_id[:80]}" does not match the subject '
                       f"{subject[:200]} (a node publishes only its own sessions' chunks)")
    if chunk.seq < 0 or chunk.seq >= 1 << 53:
        raise Rejected(f"seq: {chunk.seq} is out of range")
    if chunk.header is not None and chunk.seq != 0:
        raise Rejected(f"seq {chunk.seq}: only seq 0 may carry the header")
    if chunk.header is not None and chunk.header.version != 2:
        raise Rejected(f"header.version: {chunk.header.version} is not asciicast v2")
    for i, (t, code, _data) in enumerate(chunk.events):
        if not math.isfinite(t) or t < 0:
            raise Rejected(f"events[{i}]: time {t} is not a number of seconds >= 0")
        if not code:
            raise Rejected(f"events[{i}]: empty event code")
    return chunk


def _subject_matches(subject: str, chunk: RecordingChunk) -> bool:
    """The chunk names the node and session of its subject: a node's NATS credential publishes only
    under its own server_id, so a chunk claiming another node's session is refused."""
    try:
        return subject == names.recording_subject(chunk.server_id, chunk.sid)
    except ValueError:  # a server_id no subject can carry
        return False


# --- ordering ---------------------------------------------------------------------------------


@dataclass
class Held:
    chunk: RecordingChunk
    token: object  # the message to ack once the chunk is written
    size: int
    ident: int = 0  # the stream sequence: the same for a redelivery of the same message


@dataclass
class Sequencer:
    """The write order of one recording. `next_seq` and `ended` come from the index."""

    next_seq: int = 0
    ended: bool = False
    held: dict[int, Held] = field(default_factory=dict)
    gap_since: float | None = None  # when the current gap was first seen

    @property
    def held_bytes(self) -> int:
        return sum(h.size for h in self.held.values())


@dataclass
class Offer:
    verdict: str  # "duplicate" | "after_end" | "held" | "nak"
    replaced: object = None  # token of an older delivery of the same seq, now dropped


def offer(seq: Sequencer, chunk: RecordingChunk, token: object, size: int, held_total: int, ident: int = 0) -> Offer:
    """Where an incoming chunk goes. `held_total`: bytes held over every sid; `ident`: the
    message's stream sequence (tells a redelivery from another message with the same seq)."""
    if chunk.seq < seq.next_seq:
        return Offer("duplicate")
    if seq.ended:
        return Offer("after_end")
    old = seq.held.get(chunk.seq)
    if old is not None:
        if not ident or old.ident != ident:
            return Offer("duplicate")  # another message with a seq already held: the held one is written
        # A redelivery of the held message (held past ack_wait): keep the newest handle.
        seq.held[chunk.seq] = Held(chunk, token, size, ident)
        return Offer("held", replaced=old.token)
    if chunk.seq > seq.next_seq and (
        len(seq.held) >= HOLD_MAX_CHUNKS or held_total + size > HOLD_MAX_BYTES
    ):
        return Offer("nak")
    seq.held[chunk.seq] = Held(chunk, token, size, ident)
    return Offer("held")


@dataclass
class Advance:
    write: list[Held] = field(default_factory=list)  # in seq order
    skipped: int = 0  # seqs given up on (gap older than GAP_WAIT)
    skipped_from: int = 0
    after_end: list[Held] = field(default_factory=list)  # held chunks past the end chunk


def advance(seq: Sequencer, now: float, gap_wait: float = GAP_WAIT) -> Advance:
    """Take the held chunks that are next in order (skipping a gap open longer than gap_wait)."""
    out = Advance()
    progressed = False
    while True:
        while not seq.ended and seq.next_seq in seq.held:
            h = seq.held.pop(seq.next_seq)
            out.write.append(h)
            seq.next_seq += 1
            progressed = True
            if h.chunk.end:
                seq.ended = True
        if seq.ended:
            out.after_end.extend(seq.held[k] for k in sorted(seq.held))
            seq.held.clear()
            break
        if seq.held and seq.gap_since is not None and now - seq.gap_since >= gap_wait:
            lowest = min(seq.held)
            if not out.skipped:
                out.skipped_from = seq.next_seq
            out.skipped += lowest - seq.next_seq
            seq.next_seq = lowest
            seq.gap_since = now  # a gap after the chunks now written is a new gap
            continue
        break
    if not seq.held:
        seq.gap_since = None
    elif seq.gap_since is None or progressed:
        seq.gap_since = now
    return out


# --- the file -----------------------------------------------------------------------------------


def default_header(started: str, now: float) -> CastHeader:
    """For a recording whose own header never arrived."""
    try:
        ts = parse_time_ms(started) // 1000 if started else int(now)
    except ValueError:
        ts = int(now)
    return CastHeader(timestamp=ts)


def started_of(chunk: RecordingChunk, now: float) -> str:
    """The session start: the chunk's `started`, else the header's timestamp, else now."""
    if chunk.started:
        return chunk.started
    if chunk.header is not None and chunk.header.timestamp > 0:
        try:
            return rfc3339(chunk.header.timestamp)
        except ValueError:  # a timestamp past year 9999: the header is wrong, not the recording
            pass
    return rfc3339(now)


def rfc3339(unix: float) -> str:
    """ValueError for a time no datetime holds (before year 1, after 9999)."""
    try:
        when = dt.datetime.fromtimestamp(unix, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{unix} is not a time in years 1 to 9999") from None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ended_at(started: str, duration: float, now: float) -> str:
    """When the recording ended: its start plus the time of its last event."""
    try:
        return rfc3339(parse_time_ms(started) / 1000 + duration)
    except ValueError:
        return rfc3339(now)


def sort_ms(started: str, now: float) -> int:
    try:
        return parse_time_ms(started)
    except ValueError:
        return int(now * 1000)


# --- requests ------------------------------------------------------------------------------------


def validate_sid(sid: str) -> str:
    if not recording.is_valid_sid(sid):
        raise ApiError(f'sid: "{sid[:200]}" is not a valid session id')
    return sid


def validate_list(req: RecordingListRequest) -> RecordingListRequest:
    if not 1 <= req.limit <= recording.MAX_LIST_LIMIT:
        raise ApiError(f"limit: {req.limit} is out of range (1 to {recording.MAX_LIST_LIMIT})")
    return req


def validate_get(req: RecordingGetRequest) -> RecordingGetRequest:
    validate_sid(req.sid)
    if req.offset < 0:
        raise ApiError(f"offset: {req.offset} is negative")
    if req.limit < 1:
        raise ApiError(f"limit: {req.limit} must be at least 1")
    return req


def cut_page(data: bytes, at_end: bool) -> bytes:
    """The longest prefix of `data` that decodes as UTF-8 and, when more follows, ends a
    line if any line ends in it (so pages of a .cast file concatenate exactly)."""
    if at_end:
        return data
    nl = data.rfind(b"\n")
    if nl >= 0:
        return data[: nl + 1]
    # One line longer than the page: cut before a partial UTF-8 sequence.
    end = len(data)
    back = 0
    while back < 4 and end - back - 1 >= 0 and data[end - back - 1] & 0xC0 == 0x80:
        back += 1
    if end - back - 1 >= 0 and data[end - back - 1] >= 0xC0:
        need = 2 if data[end - back - 1] < 0xE0 else 3 if data[end - back - 1] < 0xF0 else 4
        if back + 1 < need:
            return data[: end - back - 1]
    return data
