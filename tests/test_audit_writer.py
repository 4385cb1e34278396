"""The audit writer on a real filesystem: files, modes, link, rollover, exactly-once, recovery."""

from __future__ import annotations

import datetime as dt
import os
import stat

import msgspec
import pytest

from ringfence.contract import names
from ringfence.contract.auditlog import GENESIS_HASH, daily_files, event_lines, parse_anchor, verify_files
from ringfence.contract.events import Exec, SessionCommand, SessionNetwork, encode_event
from services.audit.writer import AuditWriter, Incoming
from tests.support.nats import TEST_NODE

DAY1 = dt.datetime(2021, 7, 22, 23, 59, 58, tzinfo=dt.UTC)


class Clock:
    def __init__(self, now: dt.datetime = DAY1) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def msg(event) -> Incoming:
    """As published: on the subject of the node the event names."""
    event.server_id = event.server_id or TEST_NODE
    return Incoming(encode_event(event), names.audit_subject(event.server_id, event.event_type()), 1)


def open_writer(directory, clock=None) -> AuditWriter:
    w = AuditWriter(directory, clock or Clock())
    w.start()
    return w


def lines(path) -> list[dict]:
    return [msgspec.json.decode(line) for line in event_lines(path)]


def all_lines(directory) -> list[dict]:
    return [e for f in daily_files(directory) for e in lines(f)]


def test_first_batch_creates_the_day_file_link_and_modes(tmp_path):
    d = tmp_path / "log"
    w = open_writer(d)
    out = w.write_batch([msg(SessionNetwork(uid="u1", sid="s1")), msg(Exec(uid="u2"))])
    w.close()
    assert (out.written, out.duplicates_skipped, out.rejected) == (2, 0, 0)
    day = d / "2021-07-22.00:00:00.log"
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert stat.S_IMODE(day.stat().st_mode) == 0o640
    assert os.readlink(d / "events.log") == day.name
    assert [e["uid"] for e in lines(d / "events.log")] == ["u1", "u2"]
    assert verify_files([day]).verified == 2


def test_ei_counts_per_session_and_continues_after_a_restart(tmp_path):
    d = tmp_path / "log"
    w = open_writer(d)
    w.write_batch([msg(SessionNetwork(uid=f"a{i}", sid="A")) for i in range(3)] + [msg(Exec(uid="x"))])
    w.close()
    w = open_writer(d)
    w.write_batch([msg(SessionCommand(uid="b0", sid="B")), msg(SessionNetwork(uid="a3", sid="A"))])
    w.close()
    assert [(e["uid"], e["ei"]) for e in all_lines(d)] == [
        ("a0", 0), ("a1", 1), ("a2", 2), ("x", 0), ("b0", 0), ("a3", 3)
    ]
    assert verify_files(daily_files(d)).broken is None  # the chain continued across the restart


def test_a_uid_is_written_once_within_a_batch_across_batches_and_restarts(tmp_path):
    d = tmp_path / "log"
    w = open_writer(d)
    u1 = Exec(uid="u1")  # a redelivery or a re-sent copy: the same event, so the same time
    first = w.write_batch([msg(u1), msg(u1)])
    second = w.write_batch([msg(u1)])
    w.close()
    w = open_writer(d)
    third = w.write_batch([msg(u1), msg(Exec(uid="u2"))])
    w.close()
    assert [o.duplicates_skipped for o in (first, second, third)] == [1, 1, 1]
    assert [e["uid"] for e in all_lines(d)] == ["u1", "u2"]


def test_rollover_at_midnight_moves_the_link_and_chains_the_new_day(tmp_path):
    d = tmp_path / "log"
    clock = Clock()
    w = open_writer(d, clock)
    w.write_batch([msg(Exec(uid="u1"))])
    clock.now += dt.timedelta(seconds=5)
    w.tick()  # idle: rolls over without an event
    assert os.readlink(d / "events.log") == "2021-07-23.00:00:00.log"
    w.write_batch([msg(Exec(uid="u2"))])
    w.close()
    files = daily_files(d)
    assert [f.name for f in files] == ["2021-07-22.00:00:00.log", "2021-07-23.00:00:00.log"]
    assert [[e["uid"] for e in lines(f)] for f in files] == [["u1"], ["u2"]]
    assert verify_files(files).verified == 2
    day2_anchor = parse_anchor(files[1].read_bytes().splitlines()[0])
    assert day2_anchor.file == files[1].name and day2_anchor.prev_hash == lines(files[0])[-1]["hash"]
    alone = verify_files(files[1:])  # day 1 gone (retention): the chain starts at day 2's anchor
    assert (alone.verified, alone.broken, alone.starts_at) == (1, None, day2_anchor)
    assert verify_files(files[1:], prev_hash=GENESIS_HASH).broken.line_no == 1  # not where day 1 ended


def test_garbage_is_dead_lettered_and_the_rest_of_the_batch_written(tmp_path):
    d = tmp_path / "log"
    w = open_writer(d)
    out = w.write_batch([Incoming(b"\x00garbage", names.audit_subject(TEST_NODE, "x"), 9), msg(Exec(uid="u1"))])
    w.close()
    assert (out.written, out.rejected) == (1, 1)
    [record] = lines(d / "rejected.log")
    assert record["stream_seq"] == 9 and "malformed" in record["reason"]
    assert stat.S_IMODE((d / "rejected.log").stat().st_mode) == 0o640


def test_recovery_cuts_a_partial_last_line(tmp_path):
    d = tmp_path / "log"
    w = open_writer(d)
    w.write_batch([msg(Exec(uid="u1"))])
    w.close()
    day = daily_files(d)[0]
    with open(day, "ab") as f:  # killed in the middle of writing u2
        f.write(encode_event(Exec(uid="u2"))[:30])
    w = open_writer(d)
    w.write_batch([msg(Exec(uid="u2"))])  # the redelivery
    w.close()
    assert [e["uid"] for e in lines(day)] == ["u1", "u2"]
    assert verify_files([day]).verified == 2


def test_recovery_indexes_lines_written_before_the_index_commit(tmp_path, monkeypatch):
    d = tmp_path / "log"
    events = {u: SessionNetwork(uid=u, sid="S") for u in ("u1", "u2", "u3", "u4")}
    w = open_writer(d)
    w.write_batch([msg(events["u1"])])

    def killed(**_kw):
        raise KeyboardInterrupt("killed after the fsync of the batch, before its index transaction")

    monkeypatch.setattr(w.index, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        w.write_batch([msg(events["u2"]), msg(events["u3"])])
    monkeypatch.undo()
    w.close()
    assert [e["uid"] for e in all_lines(d)] == ["u1", "u2", "u3"]  # on disk, never acked
    w = open_writer(d)
    out = w.write_batch([msg(events[u]) for u in ("u2", "u3", "u4")])  # the redelivery, and a new one
    w.close()
    assert (out.written, out.duplicates_skipped) == (1, 2)
    assert [(e["uid"], e["ei"]) for e in all_lines(d)] == [("u1", 0), ("u2", 1), ("u3", 2), ("u4", 3)]
    assert verify_files(daily_files(d)).verified == 4


def test_a_lost_index_is_rebuilt_from_the_files(tmp_path):
    d = tmp_path / "log"
    events = [SessionNetwork(uid=f"u{i}", sid="S") for i in range(3)]
    w = open_writer(d)
    w.write_batch([msg(e) for e in events])
    w.close()
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (d / name).unlink(missing_ok=True)
    w = open_writer(d)
    out = w.write_batch([msg(events[1]), msg(SessionNetwork(uid="u9", sid="S"))])
    assert w.index.count() == 4
    w.close()
    assert (out.written, out.duplicates_skipped) == (1, 1)
    assert [e["ei"] for e in all_lines(d)] == [0, 1, 2, 3]
    assert verify_files(daily_files(d)).verified == 4


def test_a_failed_write_is_not_half_remembered(tmp_path, monkeypatch):
    d = tmp_path / "log"
    w = open_writer(d)
    w.write_batch([msg(SessionNetwork(uid="u1", sid="S"))])

    def disk_full(_data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w.daily, "append", disk_full)
    with pytest.raises(OSError):
        w.write_batch([msg(SessionNetwork(uid="u2", sid="S"))])
    monkeypatch.undo()
    w.write_batch([msg(SessionNetwork(uid="u2", sid="S"))])  # the redelivery
    w.close()
    assert [(e["uid"], e["ei"]) for e in all_lines(d)] == [("u1", 0), ("u2", 1)]
    assert verify_files(daily_files(d)).verified == 2


def test_only_one_writer_per_folder(tmp_path):
    d = tmp_path / "log"
    w = open_writer(d)
    with pytest.raises(RuntimeError, match="another audit writer"):
        AuditWriter(d)
    w.close()
    AuditWriter(d).close()


OLD_SCHEMA = """
CREATE TABLE events (seq INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE, time_ms INTEGER NOT NULL,
    event TEXT NOT NULL, user TEXT NOT NULL, sid TEXT NOT NULL, ei INTEGER NOT NULL, file TEXT NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, hash TEXT NOT NULL, line BLOB NOT NULL);
"""


def test_a_log_from_before_anchors_and_its_old_index_are_taken_over(tmp_path):
    """An upgrade: the old index (every line copied) is rebuilt from the files, the old
    file (no anchor) is continued, and the chain verifies across it."""
    import sqlite3

    from ringfence.contract.auditlog import GENESIS_HASH, seal

    d = tmp_path / "log"
    d.mkdir()
    old = [SessionNetwork(uid=f"old{i}", sid="S", user="alice") for i in range(3)]
    prev, lines_ = GENESIS_HASH, []
    for i, e in enumerate(old):
        e.ei = i
        line, prev = seal(prev, encode_event(e))
        lines_.append(line + b"\n")
    (d / "2021-07-22.00:00:00.log").write_bytes(b"".join(lines_))
    with sqlite3.connect(d / "index.sqlite") as db:
        db.executescript(OLD_SCHEMA)
    w = open_writer(d)
    out = w.write_batch([msg(old[1]), msg(SessionNetwork(uid="new", sid="S", user="alice"))])
    w.close()
    assert (out.written, out.duplicates_skipped) == (1, 1)  # the old lines were indexed again
    assert [(e["uid"], e["ei"]) for e in all_lines(d)] == [("old0", 0), ("old1", 1), ("old2", 2), ("new", 3)]
    assert verify_files(daily_files(d)).verified == 4


def test_each_event_of_a_batch_must_name_the_node_of_its_subject(tmp_path):
    from ringfence.contract.batches import COUNT_HEADER, encode_batch

    d = tmp_path / "log"
    w = open_writer(d)
    own, forged = Exec(uid="own", server_id=TEST_NODE), Exec(uid="forged", server_id="another-node")
    encoded = [encode_event(own), encode_event(forged)]
    out = w.write_batch([Incoming(encode_batch(encoded), names.audit_batch_subject(TEST_NODE), 7,
                                  headers={COUNT_HEADER: "2"})])
    w.close()
    assert (out.written, out.rejected) == (1, 1)
    assert [e["uid"] for e in all_lines(d)] == ["own"]
    [record] = lines(d / "rejected.log")
    assert 'server_id "another-node" is not the node of the subject' in record["reason"]
