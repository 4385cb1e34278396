"""The recording store in process: files, index, crashes at each step, recovery."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ringfence.contract import names, recording
from ringfence.contract.recording import CastHeader, RecordingChunk, parse_cast
from services.audit import recording_core
from services.audit.recordings import ChunkIn, RecordingReader, RecordingStore


class Clock:
    def __init__(self) -> None:
        self.now = 1714557600.0

    def __call__(self) -> float:
        return self.now


def chunk(sid: str, seq: int, end: bool = False, **kw) -> RecordingChunk:
    if seq == 0:
        kw.setdefault("header", CastHeader(width=90))
        kw.setdefault("user", "alice")
        kw.setdefault("started", "2024-05-01T10:00:00.000Z")
    kw.setdefault("server_id", "n1")
    return RecordingChunk(sid=sid, seq=seq, end=end, events=[(float(seq), "o", f"{sid}:{seq}\n")], **kw)


_stream_seq = [0]


def msg(c: RecordingChunk) -> ChunkIn:
    _stream_seq[0] += 1
    subject = names.recording_subject(c.server_id or "n1", c.sid)
    return ChunkIn(recording.encode(c), subject, _stream_seq[0], f"{c.sid}:{c.seq}")


def outputs(directory, sid: str) -> list[str]:
    return [e[2] for e in parse_cast((directory / f"{sid}.cast").read_text())[1]]


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "recordings"


def open_store(directory, clock=None) -> RecordingStore:
    s = RecordingStore(directory, clock=clock or Clock(), gap_wait=5)
    s.start()
    return s


def test_files_modes_rows_and_acks(store_dir):
    s = open_store(store_dir)
    out = s.write_batch([msg(chunk("a", 0)), msg(chunk("a", 1)), msg(chunk("a", 2, end=True))])
    assert (out.written, sorted(out.ack), out.nak) == (3, ["a:0", "a:1", "a:2"], [])
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE((store_dir / "a.cast").stat().st_mode) == 0o640
    assert stat.S_IMODE((store_dir / "index.sqlite").stat().st_mode) == 0o640
    header, _ = parse_cast((store_dir / "a.cast").read_text())
    assert header == {"version": 2, "width": 90, "height": 24}
    assert outputs(store_dir, "a") == ["a:0\n", "a:1\n", "a:2\n"]
    rec = s.index.get("a")
    assert (rec.next_seq, rec.bytes, rec.duration, rec.ended, rec.user) == (
        3, (store_dir / "a.cast").stat().st_size, 2.0, "2024-05-01T10:00:02.000Z", "alice")
    s.close()


def test_a_second_store_on_the_same_folder_is_refused(store_dir):
    s = open_store(store_dir)
    with pytest.raises(RuntimeError, match="another audit writer"):
        RecordingStore(store_dir)
    s.close()


def test_held_chunks_are_acked_when_written_and_naked_on_failure(store_dir):
    s = open_store(store_dir)
    out = s.write_batch([msg(chunk("a", 0)), msg(chunk("a", 2))])
    assert (out.ack, out.held) == (["a:0"], 1)
    out = s.write_batch([msg(chunk("a", 1))])
    assert (sorted(out.ack), out.held) == (["a:1", "a:2"], 0)

    s.write_batch([msg(chunk("a", 4))])
    assert s.fail() == ["a:4"]  # a failed batch: held chunks go back too
    assert not any(r.seq.held for r in s.recs.values())
    s.close()


def test_a_write_that_fails_after_fsync_is_cut_back_and_written_once_on_redelivery(store_dir, monkeypatch):
    s = open_store(store_dir)
    s.write_batch([msg(chunk("a", 0)), msg(chunk("a", 1))])
    committed = (store_dir / "a.cast").stat().st_size
    original_save = s.index.save

    calls = []

    def crash(recs):
        calls.append(recs)
        if len(calls) == 1:
            return original_save(recs)  # b's new row (bytes 0), committed before b's file is created
        raise OSError("simulated crash between the files' fsync and the index commit")

    monkeypatch.setattr(s.index, "save", crash)
    batch = [msg(chunk("a", 2)), msg(chunk("a", 3)), msg(chunk("b", 0))]
    with pytest.raises(OSError):
        s.write_batch(batch)
    assert (store_dir / "a.cast").stat().st_size > committed  # the lines are there, the index does not know
    monkeypatch.setattr(s.index, "save", original_save)
    s.close()

    s = open_store(store_dir)  # a restart: the index is authoritative
    assert (store_dir / "a.cast").stat().st_size == committed
    assert (store_dir / "b.cast").stat().st_size == 0  # b's row says 0 bytes
    out = s.write_batch(batch)  # redelivered
    assert out.written == 3
    assert outputs(store_dir, "a") == ["a:0\n", "a:1\n", "a:2\n", "a:3\n"]
    assert outputs(store_dir, "b") == ["b:0\n"]
    s.close()


def test_recovery_cuts_a_partial_line(store_dir):
    s = open_store(store_dir)
    s.write_batch([msg(chunk("a", 0))])
    s.close()
    with open(store_dir / "a.cast", "ab") as f:
        f.write(b'[1.0,"o","a:1\\n"]\n[2.0,"o","half')  # killed mid-write
    s = open_store(store_dir)
    s.write_batch([msg(chunk("a", 1)), msg(chunk("a", 2))])
    assert outputs(store_dir, "a") == ["a:0\n", "a:1\n", "a:2\n"]
    s.close()


def test_a_row_committed_before_its_file_was_created(store_dir, monkeypatch):
    s = open_store(store_dir)

    def crash(rec, data):
        raise OSError("simulated crash before the first append")

    monkeypatch.setattr(s, "_append", crash)
    with pytest.raises(OSError):
        s.write_batch([msg(chunk("a", 0))])
    assert s.index.get("a").bytes == 0
    s.close()
    s = open_store(store_dir)
    s.write_batch([msg(chunk("a", 0))])
    assert outputs(store_dir, "a") == ["a:0\n"]
    s.close()


def test_a_file_without_a_row_is_moved_aside_not_deleted(store_dir):
    s = open_store(store_dir)
    s.close()
    (store_dir / "stray.cast").write_text('{"version": 2}\n')
    (store_dir / "empty.cast").write_text("")
    s = open_store(store_dir)
    names_ = sorted(p.name for p in store_dir.iterdir() if "cast" in p.name)
    assert names_ == ["stray.cast.orphaned-1714557600"]
    s.close()


def test_a_file_shorter_than_its_row_continues_without_corruption(store_dir, caplog):
    s = open_store(store_dir)
    s.write_batch([msg(chunk("a", 0)), msg(chunk("a", 1))])
    s.close()
    data = (store_dir / "a.cast").read_bytes()
    (store_dir / "a.cast").write_bytes(data[:-3])  # truncated behind our back
    s = open_store(store_dir)
    assert any("but the index records" in r.getMessage() for r in caplog.records)
    s.write_batch([msg(chunk("a", 2))])
    _header, events = parse_cast((store_dir / "a.cast").read_text())
    assert [e[2] for e in events] == ["a:0\n", "a:2\n"]
    assert s.index.get("a").bytes == (store_dir / "a.cast").stat().st_size
    s.close()


def test_gaps_are_given_up_on_after_the_wait_and_a_missing_header_is_supplied(store_dir):
    clock = Clock()
    s = open_store(store_dir, clock)
    out = s.write_batch([msg(chunk("h", 2, started="2024-05-01T09:00:00Z")), msg(chunk("h", 3, end=True))])
    assert (out.written, out.held) == (0, 2)
    clock.now += 4
    assert s.tick().written == 0
    clock.now += 1
    out = s.tick()
    assert (out.written, out.gaps_skipped, sorted(out.ack)) == (2, 2, ["h:2", "h:3"])
    header, _ = parse_cast((store_dir / "h.cast").read_text())
    assert header == {"version": 2, "width": 80, "height": 24, "timestamp": 1714557600 - 3600}
    assert outputs(store_dir, "h") == ["h:2\n", "h:3\n"]
    rec = s.index.get("h")
    assert (rec.gaps, rec.next_seq, bool(rec.ended)) == (2, 4, True)
    out = s.write_batch([msg(chunk("h", 0)), msg(chunk("h", 4))])
    assert (out.duplicates_skipped, out.rejected) == (1, 1)
    rejected = [json.loads(x) for x in (store_dir / "rejected.log").read_text().splitlines()]
    assert "the recording ended at seq 3" in rejected[0]["reason"]
    s.close()


def test_hold_limit_naks(store_dir, monkeypatch):
    monkeypatch.setattr(recording_core, "HOLD_MAX_CHUNKS", 2)
    s = open_store(store_dir)
    out = s.write_batch([msg(chunk("a", i)) for i in (3, 4, 5)])
    assert (out.held, out.nak) == (2, ["a:5"])
    s.close()


def test_reader_lists_newest_first_and_reads_only_committed_bytes(store_dir):
    s = open_store(store_dir)
    s.write_batch([msg(chunk("old", 0, started="2024-05-01T09:00:00Z")),
                   msg(chunk("new", 0, started="2024-05-01T11:00:00Z", user="bob")),
                   msg(chunk("mid", 0))])
    r = RecordingReader(store_dir)
    assert [x.sid for x in r.list("", 10)] == ["new", "mid", "old"]
    assert [x.sid for x in r.list("", 2)] == ["new", "mid"]
    assert [x.sid for x in r.list("bob", 10)] == ["new"]
    rec = r.get("mid")
    with open(store_dir / "mid.cast", "ab") as f:
        f.write(b"uncommitted\n")
    assert r.read(rec, 0, 1 << 20) == (store_dir / "mid.cast").read_bytes()[: rec.bytes]
    assert r.read(rec, rec.bytes, 100) == b""
    assert r.get("nope") is None
    r.close()
    s.close()


def test_rows_survive_restart_and_numbering_continues(store_dir):
    s = open_store(store_dir)
    s.write_batch([msg(chunk("a", 0)), msg(chunk("a", 1))])
    s.close()
    s = open_store(store_dir)
    out = s.write_batch([msg(chunk("a", 1)), msg(chunk("a", 2))])
    assert (out.written, out.duplicates_skipped) == (1, 1)
    assert outputs(store_dir, "a") == ["a:0\n", "a:1\n", "a:2\n"]
    s.close()
    os.sync()
