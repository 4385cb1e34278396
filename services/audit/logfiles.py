"""The files under <data_dir>/log: append-only daily files, the events.log link, rejected.log.

Everything here is plain blocking I/O; the adapter calls it from a worker thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ringfence.contract.auditlog import CURRENT_LINK, REJECTED_FILE, daily_file_name

log = logging.getLogger(__name__)

EPOCH_DAY = dt.date(1970, 1, 1)


def day_number(when: dt.date | dt.datetime) -> int:
    """Days since 1970-01-01 of a date, or of a moment's UTC day."""
    if isinstance(when, dt.datetime):
        when = when.astimezone(dt.UTC).date() if when.tzinfo else when.date()
    return (when - EPOCH_DAY).days


def daily_path(directory: Path, day: int) -> Path:
    """The daily file of day number `day`."""
    moment = dt.datetime.combine(EPOCH_DAY + dt.timedelta(days=day), dt.time(), dt.UTC)
    return directory / daily_file_name(moment)

DIR_MODE = 0o750
FILE_MODE = 0o640
LOCK_FILE = ".lock"


def ensure_log_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; this is not


def fsync_dir(path: Path) -> None:
    """Make a new or renamed directory entry durable, not only the file's data."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_append(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # the umask may have narrowed it, or the file existed with another mode
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def cut_back(fd: int, size: int) -> None:
    """After a failed append: truncate to `size`, the end of the last whole line."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:  # recovery cuts the partial line at the next attempt
        log.error("audit log: cannot cut a failed write back to byte %d: %s", size, exc)


def lock_dir(path: Path) -> int:
    """Hold an exclusive lock on the log folder for the life of the process: two
    writers would interleave lines and fork the hash chain."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another audit writer holds {path / LOCK_FILE}; only one may write {path}") from None
    return fd


def point_link(directory: Path, target_name: str) -> None:
    """Atomically make events.log point at `target_name` (a relative link, so the
    folder can be moved or mounted elsewhere)."""
    link = directory / CURRENT_LINK
    with contextlib.suppress(OSError):
        if os.readlink(link) == target_name:
            return
    tmp = directory / f".{CURRENT_LINK}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    fsync_dir(directory)


def repair_tail(path: Path) -> int:
    """Cut a partial last line (a crash mid-write; never acked, so it will be
    redelivered). Returns the number of bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Find the last newline, reading backwards in blocks.
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class DailyLog:
    """The daily file being written, opened append-only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.day = 0  # its day number (0: none open)
        self.name = ""  # its file name
        self.size = 0  # bytes in it: the offset of the next line
        self._fd: int | None = None

    def open_day(self, day: int) -> None:
        """Write to day `day`'s file from now on (created when missing); events.log points at it."""
        if day == self.day and self._fd is not None:
            return
        self.close()
        path = daily_path(self.directory, day)
        created = not path.exists()
        self._fd = open_append(path)
        self.day, self.name = day, path.name
        self.size = os.fstat(self._fd).st_size
        if created:
            fsync_dir(self.directory)
            log.info("audit log: writing %s", path)
        point_link(self.directory, path.name)

    def append(self, data: bytes) -> int:
        """Write and fsync; returns the offset the data starts at. Not durable until this returns.

        On failure (e.g. the disk is full) the file is cut back to where it was, so no
        reader ever sees a partial line, and the OSError names the file."""
        assert self._fd is not None, "open_day() first"
        offset = self.size
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            cut_back(self._fd, offset)
            exc.filename = exc.filename or str(self.directory / self.name)
            # The caller recovers from disk (which also cuts a partial line cut_back could not).
            self.close()
            raise
        self.size = offset + len(data)
        return offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.day, self.name = 0, ""


class RejectLog:
    """rejected.log: one JSON record per message that was not an event."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / REJECTED_FILE

    def append(self, data: bytes) -> None:
        try:
            fd = open_append(self.path)
        except OSError as exc:
            exc.filename = exc.filename or str(self.path)
            raise
        try:
            offset = os.fstat(fd).st_size
            write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            cut_back(fd, offset)  # no partial record
            exc.filename = exc.filename or str(self.path)
            raise
        finally:
            os.close(fd)


@dataclass(frozen=True)
class DiskUse:
    log: int  # bytes of daily files (and rejected.log)
    index: int  # bytes of the log's index (its WAL included)
    recordings: int  # bytes of the recordings folder (files and index)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed meanwhile (retention)
        return 0


def disk_use(log_directory: Path, recordings_directory: Path | None) -> DiskUse:
    """What `ringfence status --stats` shows as log_bytes, index_bytes and recordings_bytes."""
    log_bytes = index_bytes = 0
    for path in log_directory.iterdir():
        if path.name.startswith("index.sqlite"):
            index_bytes += _size(path)
        elif path.suffix == ".log" and not path.is_symlink():
            log_bytes += _size(path)
    recordings = 0
    if recordings_directory is not None and recordings_directory.is_dir():
        recordings = sum(_size(p) for p in recordings_directory.iterdir())
    return DiskUse(log_bytes, index_bytes, recordings)
