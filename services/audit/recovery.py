"""Start-up reconciliation of the daily files with the index.

A crash can leave the log in two states the writer must not build on:
  - a partial last line (killed mid-write): it was never acked, so JetStream
    will redeliver it; the partial bytes are cut;
  - complete lines past the last indexed one (killed after fsync, before the
    index commit): they are indexed now, so their redelivery is recognised as
    a duplicate instead of being written a second time.
With an empty or lost index this rebuilds it from every daily file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ringfence.contract.auditlog import daily_files, unseal
from ringfence.contract.events import decode_event

from .core import event_time_ms
from .index import Row, WriteIndex
from .logfiles import repair_tail

log = logging.getLogger(__name__)

INSERT_CHUNK = 5000


@dataclass
class RecoveryReport:
    bytes_cut: int = 0
    lines_indexed: int = 0
    lines_unreadable: int = 0


def row_from_line(file: str, offset: int, line: bytes, fallback_ms: int) -> Row:
    """Index entry for a line already in a daily file (ValueError when it is not one of ours)."""
    _body, digest = unseal(line)
    event = decode_event(line)
    return Row(
        uid=event.uid,
        time_ms=event_time_ms(event, fallback_ms),
        event=event.event_type(),
        user=event.user,
        sid=event.sid,
        ei=event.ei,
        file=file,
        offset=offset,
        length=len(line) + 1,
        hash=digest,
        line=line,
    )


def recover(directory: Path, index: WriteIndex) -> RecoveryReport:
    report = RecoveryReport()
    files = daily_files(directory)
    nonempty = [p for p in files if p.stat().st_size > 0]
    if nonempty:
        report.bytes_cut = repair_tail(nonempty[-1])
        if report.bytes_cut:
            log.warning("audit log: cut a partial last line (%d bytes) from %s", report.bytes_cut, nonempty[-1])

    last = index.last_write()
    for path in files:
        if last is not None and path.name < last.file:
            continue
        start = last.end if last is not None and path.name == last.file else 0
        size = path.stat().st_size
        if start > size:
            log.error(
                "audit log: %s is %d bytes but the index records lines up to byte %d: "
                "the file was truncated or replaced; `ringfence events verify` will show where",
                path, size, start,
            )
            continue
        if start < size:
            _index_tail(path, start, index, report)
    if report.lines_indexed:
        log.warning("audit log: indexed %d lines written before the last stop", report.lines_indexed)
    return report


def _index_tail(path: Path, start: int, index: WriteIndex, report: RecoveryReport) -> None:
    fallback_ms = int(path.stat().st_mtime * 1000)
    rows: list[Row] = []
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # what we index must be on disk, not only in the page cache
        f.seek(start)
        offset = start
        for raw in f:
            line = raw.rstrip(b"\n")
            try:
                rows.append(row_from_line(path.name, offset, line, fallback_ms))
            except ValueError as exc:  # msgspec errors are ValueErrors too
                report.lines_unreadable += 1
                log.error("audit log: %s at byte %d is not an event line (%s); not indexed", path, offset, exc)
            offset += len(raw)
            if len(rows) >= INSERT_CHUNK:
                index.insert(rows, ignore_known=True)
                report.lines_indexed += len(rows)
                rows = []
    if rows:
        index.insert(rows, ignore_known=True)
        report.lines_indexed += len(rows)
