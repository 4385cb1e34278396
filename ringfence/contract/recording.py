"""Session recordings on the wire: asciicast v2 in chunks.

The enforcer publishes the terminal stream of each interactive session on
names.recording_subject(server_id, sid) (JetStream, stream RECORDINGS_STREAM), message
id "<sid>:<seq>"; the enforcer also sends each chunk's output, sealed, to the
session's joiners (services/enforcer/joins.py). The audit service stores them as one asciicast
v2 file per session: the header line, then one `[time, code, data]` line per
event (https://docs.asciinema.org/manual/asciicast/v2/).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import Struct, field

MAX_CHUNK_BYTES = 256 * 1024
MAX_LIST_LIMIT = 1000  # RecordingListRequest.limit

# A session id as it may appear in a subject token and a file name: the
# enforcer's UUIDs, and test ids like "s-1". No dots, slashes or wildcards.
_SID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def is_valid_sid(sid: str) -> bool:
    return _SID.fullmatch(sid) is not None


class CastHeader(Struct, omit_defaults=True):
    """The asciicast v2 header (first line of a .cast file)."""

    version: int = 2
    width: int = 80
    height: int = 24
    timestamp: int = 0  # unix seconds of the session start
    title: str = ""
    env: dict[str, str] = field(default_factory=dict)


class RecordingChunk(Struct, omit_defaults=True):
    sid: str
    seq: int  # 0, 1, 2, ... per session; (sid, seq) identifies a chunk
    # [seconds since the session start, "o" (output) | "i" (input) | "r" (resize "WxH"), data]
    events: list[tuple[float, str, str]] = field(default_factory=list)
    header: CastHeader | None = None  # on seq 0 only
    end: bool = False  # the last chunk of the session
    # Who and where, for listing recordings without reading them.
    user: str = ""
    login: str = ""
    server_id: str = ""
    server_hostname: str = ""
    started: str = ""  # RFC 3339


def msg_id(chunk: RecordingChunk) -> str:
    return f"{chunk.sid}:{chunk.seq}"


def encode(chunk: RecordingChunk) -> bytes:
    return msgspec.json.encode(chunk)


def decode(data: bytes) -> RecordingChunk:
    """The chunk in `data`; msgspec.DecodeError (ValidationError for a bad field) otherwise."""
    try:
        return msgspec.json.decode(data, type=RecordingChunk)
    except UnicodeDecodeError as exc:  # msgspec's report of bad UTF-8 inside a string
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc}") from None
    except RecursionError:  # skipping a deeply nested unknown field
        raise msgspec.DecodeError("nested too deeply") from None


def header_line(header: CastHeader) -> bytes:
    """The header as a .cast line with version, width and height always present
    (CastHeader omits defaults, so encoding it directly can give `{}`)."""
    doc: dict[str, Any] = {"version": header.version, "width": header.width, "height": header.height}
    if header.timestamp:
        doc["timestamp"] = header.timestamp
    if header.title:
        doc["title"] = header.title
    if header.env:
        doc["env"] = header.env
    return msgspec.json.encode(doc)


def cast_lines(chunk: RecordingChunk) -> list[bytes]:
    """The .cast file lines this chunk contributes (header first on seq 0)."""
    out = []
    if chunk.header is not None:
        out.append(header_line(chunk.header))
    out += [msgspec.json.encode(list(e)) for e in chunk.events]
    return out


class RecordingInfo(Struct, omit_defaults=True):
    """A stored recording, as `ringfence sessions ls --ended` lists it."""

    sid: str
    user: str = ""
    login: str = ""
    server_id: str = ""
    server_hostname: str = ""
    started: str = ""
    ended: str = ""  # empty while the session is still being recorded
    duration: float = 0.0  # seconds, from the last event
    bytes: int = 0


class RecordingListRequest(Struct, omit_defaults=True):
    user: str = ""
    limit: int = 100


class RecordingListResult(Struct):
    recordings: list[RecordingInfo]


class RecordingGetRequest(Struct):
    sid: str
    offset: int = 0  # byte offset into the .cast file, for paging large recordings
    limit: int = 512 * 1024


class RecordingGetResult(Struct):
    data: str  # .cast text from offset
    next_offset: int
    complete: bool  # True when offset+len reached the end of a finished recording


def parse_cast(text: str) -> tuple[dict[str, Any], list[tuple[float, str, str]]]:
    """Header and events of an asciicast v2 text."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty recording")
    try:
        header = msgspec.json.decode(lines[0])
    except (ValueError, RecursionError) as exc:  # msgspec's errors are ValueErrors
        raise ValueError(f"not an asciicast v2 recording (bad header line: {exc})") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise ValueError("not an asciicast v2 recording (bad header line)")
    events = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            event = msgspec.json.decode(line, type=tuple[float, str, str])
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"line {n} is not an asciicast v2 event [time, code, data]: {exc}") from None
        events.append(event)
    return header, events
