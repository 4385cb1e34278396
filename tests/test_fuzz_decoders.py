"""Fuzzing the wire decoders (issue 7): audit events, recording chunks, .cast files, and
the audit writer and recording store given random message bodies. A body that is
not what it should be is rejected with a reason (dead-lettered), never raises out
of the writer: one bad message must not block the consumer behind it."""

from __future__ import annotations

import datetime as dt
import tempfile
import uuid
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence.contract import events, names, recording
from ringfence.contract.auditlog import REJECTED_FILE, daily_files, event_lines, verify_files
from ringfence.contract.streams import MAX_EVENT_BYTES
from services.audit import core as audit_core
from services.audit import recording_core
from services.audit.recordings import ChunkIn, RecordingStore
from services.audit.writer import AuditWriter, Incoming
from tests.support.fuzz import _paths, _set, json_values, texts

pytestmark = pytest.mark.timeout(60)

FAST = settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.too_slow])

EVENT = {
    "event": "session.network", "uid": "u", "code": "T4002I", "time": "2021-07-22T22:24:14.984Z",
    "cluster_name": "c", "user": "demo", "login": "demo", "sid": "s1", "namespace": "default",
    "server_id": "x", "server_hostname": "h", "pid": 1, "cgroup_id": 2, "program": "curl",
    "src_addr": "10.0.0.5", "dst_addr": "10.0.0.6", "dst_port": 80, "version": 4, "operation": 0, "action": 1,
}
CHUNK = {
    "sid": "s-1", "seq": 0, "events": [[0.5, "o", "hello\r\n"], [1.0, "r", "80x24"]],
    "header": {"version": 2, "width": 80, "height": 24, "timestamp": 1714557600, "env": {"TERM": "xterm"}},
    "end": False, "user": "alice", "login": "alice", "server_id": "n", "server_hostname": "h",
    "started": "2024-05-01T10:00:00.000Z",
}

# Bodies that once blocked a consumer, or might: bad UTF-8 inside a string, deep nesting
# in an unknown field, numbers out of range, oversized.
NASTY_EVENT_BODIES = [
    b"", b"\xff", b"null", b"[]", b"{}", b'{"event":"exec"}', b'{"event":"nope","uid":"x"}',
    b'{"event":"exec","uid":"\xff"}', b'{"event":"exec","uid":"a","user":"\xed\xa0\x80"}',
    b'{"event":"exec","uid":"a","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    b'{"event":"exec","uid":"a","time":"9999-12-31T23:59:59-23:59"}',
    b'{"event":"exec","uid":"b","time":"0001-01-01T00:00:00+23:59"}',
    b'{"event":"session.network","uid":"c","pid":1e999}',
    b'{"event":"session.network","uid":"d","pid":123456789012345678901234567890}',
    b'{"event":"exec","uid":"e","command":"' + b"x" * MAX_EVENT_BYTES + b'"}',
]


def _mutate(draw, base: dict) -> dict:
    doc = dict(base)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)[1:]))
        delete = draw(st.booleans())
        doc = _set(doc, path, None if delete else draw(json_values | texts), delete=delete)
    return doc


@st.composite
def event_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "random", "nasty"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "nasty":
        return draw(st.sampled_from(NASTY_EVENT_BODIES))
    doc = {**EVENT, "uid": draw(st.sampled_from(["u1", "u2", str(uuid.uuid4())])),
           "event": draw(st.sampled_from([*events.EVENT_TYPES, "session.network"]))}
    if doc["event"] != "session.network":
        doc = {k: v for k, v in doc.items() if k in events.AuditEvent.__struct_fields__ or k == "event"}
    if kind == "mutated":
        doc = _mutate(draw, doc)
    return msgspec.json.encode(doc)


@st.composite
def chunk_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "random", "nasty"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "nasty":
        return draw(st.sampled_from([
            b'{"sid":"s-1","seq":0,"header":{"timestamp":123456789012345678901234567890}}',
            b'{"sid":"s-1","seq":0,"header":{"timestamp":99999999999999}}',
            b'{"sid":"s-1","seq":0,"events":[[1e300,"o","x"]],"end":true}',
            b'{"sid":"s-1","seq":0,"events":[[1.0,"o","\xff"]]}',
            b'{"sid":"s-1","seq":0,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"sid":"s-1","seq":-1}', b'{"sid":"../x","seq":0}', b'{"sid":"s-1","seq":9007199254740993}',
            b'{"sid":"s-1","seq":0,"events":[[-1,"o","x"]]}', b'{"sid":"s-1","seq":0,"events":[[1,"","x"]]}',
        ]))
    doc = {**CHUNK, "seq": draw(st.integers(0, 3))}
    if doc["seq"]:
        del doc["header"]
    if kind == "mutated":
        doc = _mutate(draw, doc)
    return msgspec.json.encode(doc)


# --- decoders ---------------------------------------------------------------------------------------------


@FAST
@given(event_bodies())
def test_decode_event_and_decode_incoming(data):
    try:
        event = events.decode_event(data)
    except msgspec.DecodeError as exc:
        assert str(exc)
    else:
        assert event.event_type() in events.EVENT_TYPES
    try:
        event, time_ms = audit_core.decode_incoming(data)
    except audit_core.Rejected as exc:
        assert str(exc)
    else:
        assert event.uid and events.encode_event(event) and time_ms == audit_core.parse_time_ms(event.time)


def test_decode_incoming_rejects_every_nasty_body_with_a_reason():
    for data in NASTY_EVENT_BODIES:
        try:
            event, _time_ms = audit_core.decode_incoming(data)
        except audit_core.Rejected as exc:
            assert str(exc), data[:100]
        else:
            assert event.uid in ("a", "b", "d"), data[:100]


@FAST
@given(chunk_bodies(), st.sampled_from(["", names.recording_subject("n", "s-1"), "ringfence.recording.other"]))
def test_decode_recording_chunk(data, subject):
    try:
        recording.decode(data)
    except msgspec.DecodeError as exc:
        assert str(exc)
    try:
        chunk = recording_core.decode_chunk(data, subject)
    except audit_core.Rejected as exc:
        assert str(exc)
    else:
        recording.cast_lines(chunk)


@FAST
@given(st.lists(st.text(max_size=60) | st.builds(lambda v: msgspec.json.encode(v).decode(), json_values)
                | st.sampled_from(['{"version": 2}', '[1.0, "o", "x"]', "1", "[" * 5000, '"\\ud800"']),
                max_size=5))
def test_parse_cast(lines):
    text = "\n".join(lines)
    try:
        header, cast_events = recording.parse_cast(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert header["version"] == 2
        assert all(len(e) == 3 and isinstance(e[0], float) for e in cast_events)


# --- the audit writer -----------------------------------------------------------------------------------------


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _count_events(path: Path) -> int:
    return len(event_lines(path))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_bodies(), min_size=1, max_size=8))
def test_audit_writer_handles_random_bodies_without_raising(bodies):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "log"
        writer = AuditWriter(directory, lambda: dt.datetime(2024, 5, 1, tzinfo=dt.UTC))
        writer.start()
        try:
            batch = [Incoming(b, "ringfence.audit.x", i) for i, b in enumerate(bodies, 1)]
            first = writer.write_batch(batch)
            assert first.written + first.duplicates_skipped + first.rejected == len(batch)
            again = writer.write_batch(batch)  # a redelivery of the whole batch writes nothing twice
            assert again.written == 0 and again.rejected == first.rejected
            assert again.duplicates_skipped == first.written + first.duplicates_skipped
        finally:
            writer.close()
        files = daily_files(directory)
        assert sum(_count_events(f) for f in files) == first.written
        assert verify_files(files).broken is None
        assert _count_lines(directory / REJECTED_FILE) == 2 * first.rejected
        for line in _lines(directory / REJECTED_FILE):
            assert msgspec.json.decode(line, type=audit_core.RejectedRecord).reason


# --- the recording store -----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk_bodies(), min_size=1, max_size=6))
def test_recording_store_handles_random_bodies_without_raising(bodies):
    with tempfile.TemporaryDirectory() as tmp:
        store = RecordingStore(Path(tmp) / "recordings", clock=lambda: 1714557600.0, gap_wait=0)
        store.start()
        try:
            batch = [ChunkIn(b, names.recording_subject("n", "s-1"), i, i) for i, b in enumerate(bodies, 1)]
            out = store.write_batch(batch)
            settled = set(out.ack) | set(out.nak)
            held = {i for i in range(1, len(batch) + 1)} - settled
            assert out.held == len(held)
            out = store.tick()  # gap_wait=0: held chunks are written now
        finally:
            store.close()
        for cast in (Path(tmp) / "recordings").glob("*.cast"):
            recording.parse_cast(cast.read_text())
