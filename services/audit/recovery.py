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

from ringfence.contract.auditlog import daily_files, day_start, parse_anchor, unseal
from ringfence.contract.events import decode_event

from .core import parse_time_ms
from .index import WriteIndex, make_loc, uid_key
from .logfiles import day_number, repair_tail

log = logging.getLogger(__name__)

INSERT_CHUNK = 5000


@dataclass
class RecoveryReport:
    bytes_cut: int = 0
    lines_indexed: int = 0
    lines_unreadable: int = 0


def stage_line(index: WriteIndex, day: int, offset: int, line: bytes) -> tuple[str, bool]:
    """Stage the index row of a line already in a daily file: (its hash, whether it is an
    event: an anchor is not indexed). ValueError when it is not one of ours."""
    _body, digest = unseal(line)
    if offset == 0 and parse_anchor(line) is not None:
        return digest, False
    event = decode_event(line)
    index.stage(make_loc(day, offset), parse_time_ms(event.time), uid_key(event.uid),
                event.event_type(), event.user, event.sid, event.ei)
    return digest, True


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
        day = day_number(day_start(path.name))
        if last is not None and day < last.day:
            continue
        start = last.end if last is not None and day == last.day else 0
        size = path.stat().st_size
        if start > size:
            log.error(
                "audit log: %s is %d bytes but the index records lines up to byte %d: "
                "the file was truncated or replaced; `ringfence events verify` will show where",
                path, size, start,
            )
            continue
        if start < size:
            _index_tail(path, day, start, index, report)
    if report.lines_indexed:
        log.warning("audit log: indexed %d lines written before the last stop", report.lines_indexed)
    return report


def _index_tail(path: Path, day: int, start: int, index: WriteIndex, report: RecoveryReport) -> None:
    staged = 0
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # what we index must be on disk, not only in the page cache
        f.seek(start)
        offset = start
        for raw in f:
            line = raw.rstrip(b"\n")
            try:
                digest, is_event = stage_line(index, day, offset, line)
                staged += is_event
            except ValueError as exc:  # msgspec errors are ValueErrors too
                report.lines_unreadable += 1
                log.error("audit log: %s at byte %d is not an event line (%s); not indexed", path, offset, exc)
            else:
                index.set_last(day, offset + len(raw), digest)
            offset += len(raw)
            if staged >= INSERT_CHUNK:
                index.commit(ignore_known=True)
                report.lines_indexed += staged
                staged = 0
    index.commit(ignore_known=True)
    report.lines_indexed += staged
