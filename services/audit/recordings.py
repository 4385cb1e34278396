"""Session recordings on disk: `<data_dir>/recordings/<sid>.cast` (asciicast v2) and
`recordings/index.sqlite`, one row per recording.

The index is authoritative: `bytes` is how much of the .cast file is complete and
`next_seq` the next chunk it needs. Per batch:
  1. decode; dead-letter what is not a chunk (fsynced to recordings/rejected.log);
  2. order the chunks per sid (recording_core: duplicates, held gaps, the end);
  3. a new recording gets its row first (bytes 0), then its file;
  4. append the lines of each file and fsync it;
  5. update every touched row in one transaction (synchronous=FULL: the commit is
     on disk before the caller acks, because acked chunks are never redelivered).
A crash between 4 and 5 leaves complete lines past `bytes`; the next start cuts
the file back to `bytes` (which also removes a partial last line) and the
unacked chunks are redelivered and written again. Nothing here is async: the
adapter calls it from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ringfence.contract.recording import RecordingChunk, RecordingInfo, cast_lines, header_line, is_valid_sid

from . import core
from .logfiles import RejectLog, ensure_log_dir, fsync_dir, lock_dir, open_append, write_all
from .recording_core import (
    GAP_WAIT,
    Held,
    Sequencer,
    advance,
    decode_chunk,
    default_header,
    ended_at,
    offer,
    sort_ms,
    started_of,
)

log = logging.getLogger(__name__)

RECORDINGS_DIR_NAME = "recordings"
INDEX_FILE = "index.sqlite"
INDEX_MODE = 0o640
CAST_SUFFIX = ".cast"
EXPIRED_SUFFIX = ".expired"  # a .cast being removed by retention (renamed first: see remove_older_than)
MAX_CACHED = 1000  # sequencers kept in memory without held chunks

SCHEMA = """
CREATE TABLE IF NOT EXISTS recordings (
    sid             TEXT PRIMARY KEY,
    user            TEXT NOT NULL DEFAULT '',
    login           TEXT NOT NULL DEFAULT '',
    server_id       TEXT NOT NULL DEFAULT '',
    server_hostname TEXT NOT NULL DEFAULT '',
    started         TEXT NOT NULL DEFAULT '',
    sort_ms         INTEGER NOT NULL,           -- started as ms (newest first)
    ended           TEXT NOT NULL DEFAULT '',   -- set by the end chunk
    duration        REAL NOT NULL DEFAULT 0,    -- time of the last event
    bytes           INTEGER NOT NULL DEFAULT 0, -- complete bytes of the .cast file
    next_seq        INTEGER NOT NULL DEFAULT 0, -- the next chunk to write
    gaps            INTEGER NOT NULL DEFAULT 0  -- seqs given up on (never arrived)
);
CREATE INDEX IF NOT EXISTS recordings_by_time ON recordings (sort_ms, sid);
CREATE INDEX IF NOT EXISTS recordings_by_user ON recordings (user, sort_ms);
"""

COLUMNS = "sid, user, login, server_id, server_hostname, started, sort_ms, ended, duration, bytes, next_seq, gaps"


def recordings_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / RECORDINGS_DIR_NAME


def cast_path(directory: Path, sid: str) -> Path:
    if not is_valid_sid(sid):  # the only way a sid becomes a path: never outside `directory`
        raise ValueError(f"not a session id: {sid!r}")
    return directory / f"{sid}{CAST_SUFFIX}"


@dataclass
class Rec:
    """A recording's row, plus its write order (held chunks live only in memory)."""

    sid: str
    user: str = ""
    login: str = ""
    server_id: str = ""
    server_hostname: str = ""
    started: str = ""
    sort_ms: int = 0
    ended: str = ""
    duration: float = 0.0
    bytes: int = 0
    next_seq: int = 0
    gaps: int = 0
    in_index: bool = False
    seq: Sequencer = field(default_factory=Sequencer)

    @classmethod
    def from_row(cls, row: tuple) -> Rec:
        rec = cls(*row, in_index=True)
        rec.seq = Sequencer(next_seq=rec.next_seq, ended=bool(rec.ended))
        return rec

    def values(self) -> tuple:
        return (self.sid, self.user, self.login, self.server_id, self.server_hostname, self.started,
                self.sort_ms, self.ended, self.duration, self.bytes, self.next_seq, self.gaps)

    def info(self) -> RecordingInfo:
        return RecordingInfo(sid=self.sid, user=self.user, login=self.login, server_id=self.server_id,
                             server_hostname=self.server_hostname, started=self.started, ended=self.ended,
                             duration=self.duration, bytes=self.bytes)


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # acked chunks are not redelivered: commits must be durable
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class RecordingIndex:
    """The writer's connection (one thread at a time)."""

    def __init__(self, path: Path) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, INDEX_MODE))
        path.chmod(INDEX_MODE)
        self.conn = _connect(path)
        self.conn.executescript(SCHEMA)

    def get(self, sid: str) -> Rec | None:
        row = self.conn.execute(f"SELECT {COLUMNS} FROM recordings WHERE sid = ?", (sid,)).fetchone()
        return Rec.from_row(row) if row else None

    def all(self) -> list[Rec]:
        return [Rec.from_row(r) for r in self.conn.execute(f"SELECT {COLUMNS} FROM recordings")]

    def older_than(self, cutoff_ms: float) -> list[str]:
        """Sids whose last output (start + duration) is before `cutoff_ms`."""
        return [r[0] for r in self.conn.execute(
            "SELECT sid FROM recordings WHERE sort_ms + duration * 1000 < ?", (cutoff_ms,))]

    def delete(self, sids: list[str]) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("DELETE FROM recordings WHERE sid = ?", [(s,) for s in sids])

    def save(self, recs: list[Rec]) -> None:
        """One transaction for every touched recording."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                f"INSERT OR REPLACE INTO recordings ({COLUMNS}) VALUES ({','.join('?' * 12)})",
                [r.values() for r in recs],
            )
        for r in recs:
            r.in_index = True

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class ChunkIn:
    data: bytes
    subject: str = ""
    stream_seq: int = 0
    token: object = None  # acked or nak'd by the caller as the outcome says


@dataclass
class Outcome:
    ack: list = field(default_factory=list)  # tokens that are durable: written, duplicate or dead-lettered
    nak: list = field(default_factory=list)  # tokens to deliver again later (hold limit reached)
    written: int = 0
    duplicates_skipped: int = 0
    rejected: int = 0
    held: int = 0
    gaps_skipped: int = 0


Clock = Callable[[], float]


class RecordingStore:
    def __init__(self, directory: Path, clock: Clock = time.time, gap_wait: float = GAP_WAIT) -> None:
        self.directory = directory
        self.clock = clock
        self.gap_wait = gap_wait
        ensure_log_dir(directory)  # 0750
        self._lock_fd = lock_dir(directory)
        self.index = RecordingIndex(directory / INDEX_FILE)
        self.rejects = RejectLog(directory)
        self.recs: dict[str, Rec] = {}
        self._inflight: list = []
        self._needs_recovery = True

    # --- start-up --------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()

    def recover(self) -> list:
        """Make every file match its row; forget in-memory state. Returns held tokens (to nak)."""
        tokens = self.drop_held()
        self.recs.clear()
        self._finish_removals()
        known = set()
        for rec in self.index.all():
            known.add(rec.sid)
            self._reconcile(rec)
        for path in sorted(self.directory.glob(f"*{CAST_SUFFIX}")):
            sid = path.name[: -len(CAST_SUFFIX)]
            if sid in known:
                continue
            if path.stat().st_size == 0:
                path.unlink()
                continue
            # Rows are committed before their file is created: only a lost or replaced index gets here.
            aside = path.with_name(f"{path.name}.orphaned-{int(self.clock())}")
            os.replace(path, aside)
            log.error("recordings: %s has no row in the index; moved aside to %s", path, aside.name)
        self._needs_recovery = False
        return tokens

    def _reconcile(self, rec: Rec) -> None:
        path = cast_path(self.directory, rec.sid)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size == rec.bytes:
            return
        if size > rec.bytes:
            # Written and fsynced but not committed: never acked, so it is redelivered.
            with open(path, "rb+") as f:
                f.truncate(rec.bytes)
                os.fsync(f.fileno())
            log.warning("recordings: cut %d uncommitted bytes from %s (redelivery writes them again)",
                        size - rec.bytes, path)
            return
        # Shorter than the index says: the file was truncated or replaced behind our back.
        kept = _cut_partial_line(path) if size else 0
        log.error("recordings: %s is %d bytes but the index records %d; continuing from byte %d "
                  "(chunks before seq %d that are gone are not written again)",
                  path, size, rec.bytes, kept, rec.next_seq)
        rec.bytes = kept
        self.index.save([rec])

    # --- retention ---------------------------------------------------------------------------

    def remove_older_than(self, cutoff_ms: float) -> list[str]:
        """Remove recordings whose last output is before `cutoff_ms` (audit.retention), except
        those with chunks held in memory. Each file is renamed aside first, then its row
        deleted, then the file: a crash in between is finished by the next start, and never
        leaves a file without a row (which recovery would take for a lost index)."""
        if self._needs_recovery:
            return []
        sids = [s for s in self.index.older_than(cutoff_ms) if not (s in self.recs and self.recs[s].seq.held)]
        for sid in sids:
            path = cast_path(self.directory, sid)
            if path.exists():
                os.replace(path, path.with_name(path.name + EXPIRED_SUFFIX))
        self.index.delete(sids)
        for sid in sids:
            self.recs.pop(sid, None)
        self._finish_removals()
        if sids:
            log.info("recordings: removed %d recording(s) older than the retention", len(sids))
        return sids

    def _finish_removals(self) -> None:
        expired = list(self.directory.glob(f"*{CAST_SUFFIX}{EXPIRED_SUFFIX}"))
        if not expired:
            return
        self.index.delete([p.name[: -len(CAST_SUFFIX + EXPIRED_SUFFIX)] for p in expired])
        for path in expired:
            path.unlink(missing_ok=True)
        fsync_dir(self.directory)

    # --- writing -----------------------------------------------------------------------------

    def write_batch(self, batch: list[ChunkIn]) -> Outcome:
        """Make every message of `batch` durable, held, or due for redelivery (see Outcome).
        Raises when writing failed: then call fail() and nak the batch and what it returns."""
        if self._needs_recovery:
            self.recover()
        try:
            return self._write(batch)
        except BaseException:
            self._needs_recovery = True
            raise

    def tick(self) -> Outcome:
        """Called when idle: give up on gaps open longer than gap_wait."""
        if self._needs_recovery or not any(r.seq.held for r in self.recs.values()):
            return Outcome()
        return self.write_batch([])

    def fail(self) -> list:
        """After write_batch raised: the tokens of every held chunk, and of those the failed batch
        took out of holding (nak them with the batch); everything is recovered from disk next time."""
        self._needs_recovery = True
        tokens, self._inflight = self._inflight, []
        return tokens + self.drop_held()

    def drop_held(self) -> list:
        tokens = []
        for rec in self.recs.values():
            tokens += [h.token.token for h in rec.seq.held.values()]
            rec.seq.held.clear()
            rec.seq.gap_since = None
        return tokens

    def _rec(self, sid: str) -> Rec:
        rec = self.recs.get(sid)
        if rec is None:
            rec = self.index.get(sid) or Rec(sid=sid)
            self.recs[sid] = rec
        return rec

    def _write(self, batch: list[ChunkIn]) -> Outcome:
        now = self.clock()
        out = Outcome()
        rejected: list[bytes] = []

        def reject(reason: str, msg: ChunkIn) -> None:
            log.warning("recordings: rejected message %d on %s: %s", msg.stream_seq, msg.subject, reason)
            rejected.append(core.rejected_line(reason, msg.subject, msg.stream_seq, msg.data,
                                               dt.datetime.fromtimestamp(now, dt.UTC)))
            out.ack.append(msg.token)

        chunks: list[tuple[RecordingChunk, ChunkIn]] = []
        for msg in batch:
            try:
                chunks.append((decode_chunk(msg.data, msg.subject), msg))
            except core.Rejected as exc:
                reject(str(exc), msg)
        chunks.sort(key=lambda c: (c[0].sid, c[0].seq))
        self._inflight = []  # tokens of held chunks taken out of memory by this batch

        held_total = sum(r.seq.held_bytes for r in self.recs.values())
        touched: dict[str, Rec] = {}
        for chunk, msg in chunks:
            rec = self._rec(chunk.sid)
            # Held chunks keep their whole message (dead letter, ack).
            o = offer(rec.seq, chunk, msg, len(msg.data), held_total, msg.stream_seq)
            if o.verdict == "duplicate":
                out.duplicates_skipped += 1
                out.ack.append(msg.token)
            elif o.verdict == "after_end":
                reject(f"seq {chunk.seq}: the recording ended at seq {rec.seq.next_seq - 1}", msg)
            elif o.verdict == "nak":
                out.nak.append(msg.token)
            else:
                if o.replaced is None:
                    held_total += len(msg.data)
                # A replaced older delivery of the same message needs no ack of its own.
                touched[rec.sid] = rec
        for rec in self.recs.values():
            if rec.seq.held:
                touched[rec.sid] = rec  # their gaps may have expired

        files: list[tuple[Rec, bytes]] = []
        changed: list[Rec] = []
        for rec in touched.values():
            adv = advance(rec.seq, now, self.gap_wait)
            for h in adv.after_end:
                reject(f"seq {h.chunk.seq}: the recording ended at seq {rec.seq.next_seq - 1}", h.token)
            if adv.skipped:
                log.warning("recordings: %s: gave up on seq %d to %d (missing for %.0fs); continuing at seq %d",
                            rec.sid, adv.skipped_from, adv.skipped_from + adv.skipped - 1, self.gap_wait,
                            adv.skipped_from + adv.skipped)
                rec.gaps += adv.skipped
                out.gaps_skipped += adv.skipped
            out.held += sum(1 for _ in rec.seq.held)
            if not adv.write and not adv.skipped:
                continue
            data = self._apply(rec, adv.write, now)
            changed.append(rec)
            if data:
                files.append((rec, data))
            out.written += len(adv.write)
            out.ack += [h.token.token for h in adv.write]
            self._inflight += [h.token.token for h in adv.write]

        if rejected:
            self.rejects.append(b"".join(rejected))
            out.rejected = len(rejected)
        new = [r for r in changed if not r.in_index]
        if new:
            # The row (bytes 0) before the file: a file without a row means a lost index.
            self.index.save([_as_empty(r) for r in new])
        for rec, data in files:
            self._append(rec, data)
        if changed:
            self.index.save(changed)
        self._trim_cache()
        self._inflight = []
        return out

    def _apply(self, rec: Rec, written: list[Held], now: float) -> bytes:
        """Update the row for these chunks (in order) and return the bytes to append."""
        lines: list[bytes] = []
        for h in written:
            chunk = h.chunk
            if not rec.started:
                rec.started = started_of(chunk, now)
                rec.sort_ms = sort_ms(rec.started, now)
            for name in ("user", "login", "server_id", "server_hostname"):
                if not getattr(rec, name) and getattr(chunk, name):
                    setattr(rec, name, getattr(chunk, name))
            if rec.bytes == 0 and not lines:
                if chunk.header is None:
                    log.warning("recordings: %s: no header (seq 0) before seq %d; wrote a default one",
                                rec.sid, chunk.seq)
                lines.append(header_line(chunk.header or default_header(rec.started, now)))
            # Only seq 0 carries a header (decode_chunk); it is written first, above, or never.
            lines += cast_lines(msgspec.structs.replace(chunk, header=None))
            for t, _code, _data in chunk.events:
                rec.duration = max(rec.duration, t)
            if chunk.end:
                rec.ended = ended_at(rec.started, rec.duration, now)
        rec.next_seq = rec.seq.next_seq
        data = b"".join(line + b"\n" for line in lines)
        rec.bytes += len(data)
        return data

    def _append(self, rec: Rec, data: bytes) -> None:
        path = cast_path(self.directory, rec.sid)
        created = not path.exists()
        fd = open_append(path)
        try:
            start = os.fstat(fd).st_size
            if start != rec.bytes - len(data):
                raise RuntimeError(f"{path} is {start} bytes; expected {rec.bytes - len(data)}")
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.directory)

    def _trim_cache(self) -> None:
        if len(self.recs) <= MAX_CACHED:
            return
        for sid in [s for s, r in self.recs.items() if not r.seq.held]:
            del self.recs[sid]

    def close(self) -> None:
        self.index.close()
        os.close(self._lock_fd)


def _as_empty(rec: Rec) -> Rec:
    return Rec(sid=rec.sid, user=rec.user, login=rec.login, server_id=rec.server_id,
               server_hostname=rec.server_hostname, started=rec.started, sort_ms=rec.sort_ms)


def _cut_partial_line(path: Path) -> int:
    from .logfiles import repair_tail

    repair_tail(path)
    return path.stat().st_size


# --- reading (the endpoints) ---------------------------------------------------------------------


class RecordingReader:
    """A read-only index connection and the files, for the list and get endpoints."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.conn = _connect(directory / INDEX_FILE, readonly=True)
        self._lock = threading.Lock()

    def get(self, sid: str) -> Rec | None:
        with self._lock:
            row = self.conn.execute(f"SELECT {COLUMNS} FROM recordings WHERE sid = ?", (sid,)).fetchone()
        return Rec.from_row(row) if row else None

    def list(self, user: str, limit: int) -> list[RecordingInfo]:
        where, params = ("WHERE user = ?", [user]) if user else ("", [])
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {COLUMNS} FROM recordings {where} ORDER BY sort_ms DESC, sid DESC LIMIT ?",
                [*params, limit],
            ).fetchall()
        return [Rec.from_row(r).info() for r in rows]

    def read(self, rec: Rec, offset: int, limit: int) -> bytes:
        """Up to `limit` committed bytes from `offset` (never past the row's `bytes`)."""
        n = max(0, min(limit, rec.bytes - offset))
        if n == 0:
            return b""
        with open(cast_path(self.directory, rec.sid), "rb") as f:
            f.seek(offset)
            return f.read(n)

    def close(self) -> None:
        self.conn.close()
