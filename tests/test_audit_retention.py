"""audit.retention: old days of the log (files and index rows) and old recordings go;
`ringfence events verify` still passes; what is kept is searched as before; the disk
use shows in the service's counters (`ringfence status --stats`)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import msgspec
import pytest

from ringfence.config import ConfigError, load_config
from ringfence.contract import names, recording
from ringfence.contract.api import SearchRequest
from ringfence.contract.auditlog import daily_files, event_lines, parse_anchor
from ringfence.contract.events import SessionNetwork, encode_event
from ringfence.contract.recording import CastHeader, RecordingChunk
from services.audit import core
from services.audit.index import INDEX_FILE, SearchIndex
from services.audit.logfiles import daily_path
from services.audit.recordings import EXPIRED_SUFFIX, ChunkIn, RecordingStore
from services.audit.writer import AuditWriter, Incoming
from tests.support.nats import TEST_NODE
from tests.support.procs import ROOT, wait_for
from tests.test_audit_flow import counters

DAY = 86_400
DAY1 = dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)


def at(day: int, hour: int = 12) -> dt.datetime:
    return DAY1 + dt.timedelta(days=day - 1, hours=hour - 12)


def denial(uid: str, when: dt.datetime) -> Incoming:
    """A denial stored in the stream at `when` (its day decides its file)."""
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = SessionNetwork(uid=uid, sid="S", user="alice", time=stamp, dst_port=int(when.timestamp()) % 65536,
                           server_id=TEST_NODE)
    return Incoming(encode_event(event), names.audit_subject(TEST_NODE, event.event_type()), 0,
                    int(when.timestamp() * 1000))


def verify(data_dir):
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", "events", "verify", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=30, cwd=ROOT)


def search_uids(log_dir, **request) -> list[str]:
    index = SearchIndex(log_dir / INDEX_FILE, lambda day: daily_path(log_dir, day))
    try:
        rows = index.search(core.validate_search(SearchRequest(limit=1000, **request)))
    finally:
        index.close()
    return [msgspec.json.decode(line)["uid"] for _t, _loc, line in rows]


def test_old_days_go_with_their_index_rows_and_verify_still_passes(tmp_path):
    log_dir = tmp_path / "data" / "log"
    now = [at(1)]
    writer = AuditWriter(log_dir, clock=lambda: now[0], retention_seconds=2 * DAY)
    writer.start()
    for day in range(1, 6):  # five days, two events each
        writer.write_batch([denial(f"d{day}a", at(day, 9)), denial(f"d{day}b", at(day, 15))])
    assert len(daily_files(log_dir)) == 5

    now[0] = at(5)  # keep 2 days: days 3, 4 and 5 have events younger than that
    removed = writer.retention_step()
    assert removed.files_removed == ["2024-05-01.00:00:00.log", "2024-05-02.00:00:00.log"]
    assert removed.rows_removed == 4
    assert [f.name[:10] for f in daily_files(log_dir)] == ["2024-05-03", "2024-05-04", "2024-05-05"]
    writer.write_batch([denial("d5c", at(5, 18))])  # writing goes on; ei continues
    writer.close()

    assert search_uids(log_dir) == ["d3a", "d3b", "d4a", "d4b", "d5a", "d5b", "d5c"]
    assert search_uids(log_dir, user="alice", start="2024-05-01T00:00:00Z", end="2024-05-03T00:00:00Z") == []
    assert [msgspec.json.decode(line)["ei"] for line in event_lines(daily_files(log_dir)[-1])] == [8, 9, 10]
    result = verify(tmp_path / "data")
    assert (result.returncode, result.stdout.strip()) == (0, "OK: 7 events verified"), result.stderr
    assert "the chain starts at the anchor of 2024-05-03.00:00:00.log" in result.stderr

    # Removing a day in the middle is still caught: the next day's anchor names its last line.
    (log_dir / "2024-05-04.00:00:00.log").unlink()
    broken = verify(tmp_path / "data")
    assert broken.returncode == 1 and "2024-05-05.00:00:00.log line 1" in broken.stderr
    assert "a day before this one was removed or changed" in broken.stderr


def test_the_day_being_written_is_never_removed(tmp_path):
    log_dir = tmp_path / "log"
    now = [at(1)]
    writer = AuditWriter(log_dir, clock=lambda: now[0], retention_seconds=DAY)
    writer.start()
    writer.write_batch([denial("old", at(1))])
    now[0] = at(30)  # nothing arrived for a month: the last written day stays until a newer one exists
    assert writer.retention_step().files_removed == []
    writer.write_batch([denial("new", at(30))])
    now[0] += dt.timedelta(minutes=5)  # past the minute between looks
    assert writer.retention_step().files_removed == ["2024-05-01.00:00:00.log"]
    writer.close()
    [kept] = daily_files(log_dir)
    assert parse_anchor(kept.read_bytes().splitlines()[0]).file == kept.name


@pytest.mark.parametrize(("value", "message"), [
    ("12h", 'audit.retention: "12h" is shorter than 1d'),
    ("soon", 'audit.retention: "soon" is not a duration'),
])
def test_a_bad_retention_is_refused_with_the_value(value, message, tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(f"audit:\n  retention: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), data_dir=str(tmp_path))
    assert message in str(info.value) and str(path) in str(info.value)
    path.write_text("audit:\n  retention: 90d\n")
    assert load_config(str(path), data_dir=str(tmp_path)).audit.retention_seconds == 90 * DAY


def _chunk(sid: str, seq: int, started: str, end: bool = False) -> ChunkIn:
    c = RecordingChunk(sid=sid, seq=seq, end=end, events=[(1.0, "o", "x\n")], user="alice", started=started,
                       header=CastHeader() if seq == 0 else None, server_id=TEST_NODE)
    return ChunkIn(recording.encode(c), names.recording_subject(TEST_NODE, sid), seq + 1, f"{sid}:{seq}")


def test_old_recordings_go_and_a_removal_cut_short_is_finished_at_start(tmp_path):
    directory = tmp_path / "recordings"
    store = RecordingStore(directory)
    store.start()
    store.write_batch([_chunk("old-1", 0, "2024-05-01T10:00:00.000Z"), _chunk("old-1", 1, "", end=True),
                       _chunk("old-2", 0, "2024-05-01T11:00:00.000Z"), _chunk("old-2", 2, ""),
                       _chunk("new-1", 0, "2024-05-20T10:00:00.000Z")])
    cutoff = dt.datetime(2024, 5, 10, tzinfo=dt.UTC).timestamp() * 1000
    assert store.remove_older_than(cutoff) == ["old-1"]  # old-2 holds seq 2 until seq 1 comes: it waits
    assert not (directory / "old-1.cast").exists() and store.index.get("old-1") is None
    assert store.index.get("new-1") is not None
    store.close()

    # A removal cut short after renaming the file aside: the next start finishes it.
    (directory / "new-1.cast").rename(directory / f"new-1.cast{EXPIRED_SUFFIX}")
    store = RecordingStore(directory)
    store.start()
    assert store.index.get("new-1") is None and not list(directory.glob(f"*{EXPIRED_SUFFIX}"))
    assert not list(directory.glob("*.orphaned-*"))
    store.close()


def test_the_service_applies_retention_and_reports_disk_use(nats_server, data_dir, services, tmp_path):
    log_dir = data_dir / "log"
    writer = AuditWriter(log_dir)  # days written long ago, as if the service had run then
    writer.start()
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    writer.write_batch([denial("ancient", old), denial("recent", dt.datetime.now(dt.UTC) - dt.timedelta(days=2))])
    writer.close()
    ancient = daily_path(log_dir, old.date().toordinal() - dt.date(1970, 1, 1).toordinal())
    assert ancient.exists()
    config = tmp_path / "node.yaml"
    config.write_text("audit:\n  retention: 30d\n")
    services("audit", extra=("--config", str(config)))
    wait_for(lambda: not ancient.exists(), 15, what="the day older than 30d removed")
    stats = wait_for(lambda: (c := counters(nats_server.url)) and c["retention_files_removed"] == 1 and c, 15,
                     what="the removal counted")
    assert stats["log_bytes"] == sum(f.stat().st_size for f in daily_files(log_dir))
    assert stats["index_bytes"] > 0 and "recordings_bytes" in stats
    assert search_uids(log_dir) == ["recent"]
    result = verify(data_dir)
    assert (result.returncode, result.stdout.strip()) == (0, "OK: 1 events verified"), result.stderr
    status = subprocess.run([sys.executable, "-m", "ringfence.cli.main", "status", "--stats", "--nats-url",
                             nats_server.url], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert f"log_bytes={stats['log_bytes']}" in status.stdout
