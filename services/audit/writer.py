"""The audit writer: one batch of messages in, lines durably on disk and indexed, then ack.

Order per batch (what makes it exactly-once with at-least-once delivery):
  1. decode; dead-letter what is not an event (fsynced to rejected.log);
  2. drop uids the index already has, and repeats within the batch;
  3. number (ei), hash-chain and append the lines, then fsync;
  4. index them in one transaction;
and only then does the caller ack. A crash between 3 and 4 is repaired by
recovery.py at the next start.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ringfence.contract.auditlog import GENESIS_HASH, seal
from ringfence.contract.events import AuditEvent, encode_event

from . import core
from .index import INDEX_FILE, Row, WriteIndex
from .logfiles import DailyLog, RejectLog, ensure_log_dir, lock_dir
from .recovery import recover

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Incoming:
    data: bytes
    subject: str = ""
    stream_seq: int = 0


@dataclass
class BatchOutcome:
    written: int = 0
    duplicates_skipped: int = 0
    rejected: int = 0


class AuditWriter:
    def __init__(self, directory: Path, clock: Clock = utc_now) -> None:
        self.directory = directory
        self.clock = clock
        ensure_log_dir(directory)
        self._lock_fd = lock_dir(directory)
        self.index = WriteIndex(directory / INDEX_FILE)
        self.daily = DailyLog(directory)
        self.rejects = RejectLog(directory)
        self.sessions = core.SessionCounter(self.index.last_ei)
        self.prev_hash = GENESIS_HASH
        self._needs_recovery = True

    def start(self) -> None:
        """Reconcile files and index, then open today's file (so events.log exists)."""
        self._recover()
        self.daily.roll_to(self.clock())

    def _recover(self) -> None:
        self.daily.close()
        recover(self.directory, self.index)
        last = self.index.last_write()
        self.prev_hash = last.hash if last else GENESIS_HASH
        self.sessions.forget()
        self._needs_recovery = False

    def tick(self) -> None:
        """Called when idle: roll over at midnight even when no event arrives."""
        if not self._needs_recovery:
            self.daily.roll_to(self.clock())

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
            raise

    def _write(self, batch: list[Incoming]) -> BatchOutcome:
        now = self.clock()
        outcome = BatchOutcome()
        events: list[AuditEvent] = []
        rejected: list[bytes] = []
        for msg in batch:
            try:
                events.append(core.decode_incoming(msg.data, msg.subject))
            except core.Rejected as exc:
                log.warning("audit: rejected message %d on %s: %s", msg.stream_seq, msg.subject, exc)
                rejected.append(core.rejected_line(str(exc), msg.subject, msg.stream_seq, msg.data, now))
        if rejected:
            self.rejects.append(b"".join(rejected))
            outcome.rejected = len(rejected)

        known = self.index.known_uids([e.uid for e in events])
        self.daily.roll_to(now)
        fallback_ms = int(now.timestamp() * 1000)
        rows: list[Row] = []
        chunks: list[bytes] = []
        offset = self.daily.size
        prev = self.prev_hash
        for event in events:
            if event.uid in known:
                outcome.duplicates_skipped += 1
                continue
            known.add(event.uid)
            event.ei = self.sessions.assign(event.sid)
            line, prev = seal(prev, encode_event(event))
            rows.append(
                Row(
                    uid=event.uid,
                    time_ms=core.event_time_ms(event, fallback_ms),
                    event=event.event_type(),
                    user=event.user,
                    sid=event.sid,
                    ei=event.ei,
                    file=self.daily.name,
                    offset=offset,
                    length=len(line) + 1,
                    hash=prev,
                    line=line,
                )
            )
            chunks.append(line + b"\n")
            offset += len(line) + 1
        if rows:
            self.daily.append(b"".join(chunks))
            self.index.insert(rows)
            self.prev_hash = prev
            outcome.written = len(rows)
        return outcome

    def close(self) -> None:
        self.daily.close()
        self.index.close()
        os.close(self._lock_fd)
