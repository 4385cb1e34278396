"""The audit writer: one batch of messages in, lines durably on disk and indexed, then ack.

Order per batch (what makes it exactly-once with at-least-once delivery):
  1. decode (a batch message is split into its events); dead-letter what is not an
     event (fsynced to rejected.log);
  2. drop events the index already has (same uid and time), and repeats within the batch;
  3. number (ei), hash-chain and append the lines, then fsync (once per file per batch);
  4. index them in one transaction;
and only then does the caller ack. A crash between 3 and 4 is repaired by
recovery.py at the next start.

Which daily file a line goes to is decided by when the stream stored its message
(never going back to an earlier day), not by this process's clock: two audit
services reading the same stream write the same files, byte for byte.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ringfence.contract.auditlog import GENESIS_HASH, anchor_line, daily_files, day_start, seal
from ringfence.contract.batches import BatchError, events_in
from ringfence.contract.events import AuditEvent, encode_event

from . import core
from .index import INDEX_FILE, WriteIndex, make_loc, uid_key
from .logfiles import DailyLog, RejectLog, day_number, ensure_log_dir, fsync_dir, lock_dir
from .recovery import recover

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
RETENTION_CHECK = 60.0  # seconds between looks for days to remove


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Incoming:
    data: bytes
    subject: str = ""
    stream_seq: int = 0
    stored_ms: int = 0  # when the stream stored it (ms since the epoch); 0: now, by the writer's clock
    headers: dict[str, str] | None = None  # a batch message's say how many events it holds


@dataclass
class BatchOutcome:
    written: int = 0
    duplicates_skipped: int = 0
    rejected: int = 0


@dataclass
class RetentionOutcome:
    files_removed: list[str] = field(default_factory=list)
    rows_removed: int = 0


class AuditWriter:
    def __init__(self, directory: Path, clock: Clock = utc_now, retention_seconds: float = 0) -> None:
        self.directory = directory
        self.clock = clock
        self.retention_seconds = retention_seconds
        ensure_log_dir(directory)
        self._lock_fd = lock_dir(directory)
        self.index = WriteIndex(directory / INDEX_FILE)
        self.daily = DailyLog(directory)
        self.rejects = RejectLog(directory)
        self.prev_hash = GENESIS_HASH
        self.day = 0  # the day of the file written last (day number); 0: none yet
        self._needs_recovery = True
        self._next_retention_check = 0.0

    def start(self) -> None:
        """Reconcile files and index, then open the current file (so events.log exists)."""
        self._recover()
        self.daily.open_day(self.day or day_number(self.clock()))

    def _recover(self) -> None:
        self.daily.close()
        self.index.forget()
        recover(self.directory, self.index)
        last = self.index.last_write()
        self.prev_hash = last.hash if last else GENESIS_HASH
        self.day = last.day if last else 0
        self._needs_recovery = False

    def tick(self) -> None:
        """Called when idle: at midnight events.log moves to the new day's (empty) file even
        when no event arrives. Its anchor is written with its first line."""
        if self._needs_recovery:
            return
        today = day_number(self.clock())
        if today > self.daily.day:
            self.daily.open_day(today)

    def write_batch(self, batch: list[Incoming]) -> BatchOutcome:
        """Make every message of `batch` durable (written, skipped or dead-lettered).
        Raises when that failed; then nothing may be acked and the next call recovers first."""
        if self._needs_recovery:
            self._recover()
        try:
            return self._write(batch)
        except BaseException:
            # Partial lines, ei numbers or hashes may have been handed out for
            # lines that are not indexed: start again from what is on disk.
            self._needs_recovery = True
            self.index.forget()
            raise

    def _decode(self, batch: list[Incoming], now: dt.datetime,
                outcome: BatchOutcome) -> list[tuple[AuditEvent, int, bytes | str, int]]:
        """(event, time_ms, uid key, stored day) of every event not yet written, in order."""
        found = []
        rejected: list[bytes] = []
        today = day_number(now)
        for msg in batch:
            stored_day = msg.stored_ms // 86_400_000 if msg.stored_ms else today
            try:
                lines = events_in(msg.subject, msg.headers, msg.data)
            except BatchError as exc:
                lines = []
                log.warning("audit: rejected message %d on %s: %s", msg.stream_seq, msg.subject, exc)
                rejected.append(core.rejected_line(str(exc), msg.subject, msg.stream_seq, msg.data, now))
            for data in lines:
                try:
                    event, time_ms = core.decode_incoming(data, msg.subject)
                except core.Rejected as exc:
                    log.warning("audit: rejected message %d on %s: %s", msg.stream_seq, msg.subject, exc)
                    rejected.append(core.rejected_line(str(exc), msg.subject, msg.stream_seq, data, now))
                    continue
                found.append((event, time_ms, uid_key(event.uid), stored_day))
        if rejected:
            self.rejects.append(b"".join(rejected))
            outcome.rejected = len(rejected)
        known = self.index.known([(t, k) for _e, t, k, _d in found])
        fresh = []
        for item in found:
            key = (item[1], item[2])
            if key in known:
                outcome.duplicates_skipped += 1
                continue
            known.add(key)
            fresh.append(item)
        return fresh

    def _write(self, batch: list[Incoming]) -> BatchOutcome:
        now = self.clock()
        outcome = BatchOutcome()
        chunks: list[bytes] = []
        offset = self.daily.size
        prev = self.prev_hash

        def flush() -> None:
            nonlocal chunks
            if chunks:
                self.daily.append(b"".join(chunks))
                chunks = []
                self.index.set_last(self.day, self.daily.size, prev)

        for event, time_ms, key, stored_day in self._decode(batch, now, outcome):
            day = max(self.day, stored_day)
            if day != self.daily.day:
                flush()
                self.daily.open_day(day)
                offset = self.daily.size
            self.day = day
            if offset == 0:  # a new file begins with its anchor
                line, prev = anchor_line(self.daily.name, prev)
                chunks.append(line + b"\n")
                offset = len(line) + 1
            event.ei = self.index.next_ei(event.sid)
            line, prev = seal(prev, encode_event(event))
            self.index.stage(make_loc(day, offset), time_ms, key, event.event_type(), event.user,
                             event.sid, event.ei)
            chunks.append(line + b"\n")
            offset += len(line) + 1
            outcome.written += 1
        flush()
        if outcome.written:
            self.index.commit()
            self.prev_hash = prev
        return outcome

    # --- retention -------------------------------------------------------------------------------

    def retention_step(self, max_rows: int = 5000) -> RetentionOutcome:
        """Remove daily files (and their index rows) older than the retention, a bounded
        amount per call so that writing goes on meanwhile. The file being written is never
        removed; the next file's anchor keeps `events verify` passing (contract/auditlog.py)."""
        outcome = RetentionOutcome()
        now = self.clock()
        if self.retention_seconds <= 0 or self._needs_recovery or now.timestamp() < self._next_retention_check:
            return outcome
        cutoff = core.retention_cutoff(now, self.retention_seconds)
        assert cutoff is not None
        keep_from = min(day_number(cutoff), self.day or day_number(now))
        old = [p for p in daily_files(self.directory) if day_number(day_start(p.name)) < keep_from]
        for removed in self.index.remove_days_before(keep_from, chunk=max_rows):
            outcome.rows_removed += removed
            if outcome.rows_removed >= max_rows:
                return outcome  # more next time
        for path in old:
            path.unlink(missing_ok=True)
            outcome.files_removed.append(path.name)
            log.info("audit log: removed %s (older than the retention of %s days)", path.name,
                     f"{self.retention_seconds / 86400:g}")
        if old:
            fsync_dir(self.directory)
        self._next_retention_check = now.timestamp() + RETENTION_CHECK
        return outcome

    def close(self) -> None:
        self.daily.close()
        self.index.close()
        os.close(self._lock_fd)
