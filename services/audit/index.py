"""The SQLite index beside the log: which uids are written, where each line is, and what to
search it by. It holds no line: a row points into its daily file.

Sizes (measured by `python -m bench audit` at 10M events): about 200 bytes per event against
about 570 for the line it points to. What keeps it small:
  - `loc` (the rowid) is where the line is: `day << 40 | byte offset` in that day's file.
    It is also the write order, and the same on every audit service that wrote the same
    log (HA): search pages by (time_ms, loc), so a page key from one answers on the other;
  - users, event types and sessions are small integers (labels, sessions tables);
  - a UUID uid is 16 bytes (any other uid is kept as text, which never equals a blob).
Indexes: one per common search (time; user, sid, type and user+type, each followed by
time, so every one returns rows already in time order, and holds all a search needs:
time and rowid) and (time_ms, uid), which finds a redelivered event: a redelivery is the
same event, so it has the same time, and keys that grow with time keep inserts near the
end of the tree (a unique index on the random uid alone made inserts 15 times slower
at 2 million rows).

The daily files are the record; the index can be rebuilt from them (recovery.py), so it
runs with synchronous=NORMAL: a commit lost to a power cut is re-derived from the
(fsynced) files on the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ringfence.contract.streams import MAX_EVENT_BYTES

from .core import SearchIds, SearchQuery, search_sql

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"
INDEX_MODE = 0o640
SCHEMA_VERSION = 2  # before: the first index, which kept every line (rebuilt from the files on upgrade)

OFFSET_BITS = 40  # a daily file up to 1 TiB
OFFSET_MASK = (1 << OFFSET_BITS) - 1

SCHEMA = f"""
PRAGMA user_version = {SCHEMA_VERSION};
CREATE TABLE IF NOT EXISTS events (
    loc     INTEGER PRIMARY KEY,  -- day << 40 | byte offset of the line; also the write order
    time_ms INTEGER NOT NULL,     -- the event's own time
    uid     BLOB NOT NULL,        -- 16 bytes of a UUID, or the uid's text
    type    INTEGER NOT NULL,     -- labels.id
    user    INTEGER NOT NULL,     -- labels.id
    sid     INTEGER NOT NULL      -- sessions.id
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_uid ON events (time_ms, uid);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time_ms);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user, time_ms);
CREATE INDEX IF NOT EXISTS events_by_sid ON events (sid, time_ms);
CREATE INDEX IF NOT EXISTS events_by_type ON events (type, time_ms);
CREATE INDEX IF NOT EXISTS events_by_user_type ON events (user, type, time_ms);
CREATE TABLE IF NOT EXISTS labels (   -- user names and event types
    id   INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,            -- USER or TYPE
    name TEXT NOT NULL,
    UNIQUE (kind, name)
);
CREATE TABLE IF NOT EXISTS sessions (
    id      INTEGER PRIMARY KEY,
    sid     TEXT NOT NULL UNIQUE,
    next_ei INTEGER NOT NULL          -- ei of the session's next event
);
CREATE TABLE IF NOT EXISTS state (    -- one row: how far the log is indexed
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    loc  INTEGER NOT NULL,            -- day << 40 | end of the last indexed line (or anchor)
    hash TEXT NOT NULL                -- the hash of that line
);
"""

USER, TYPE = 0, 1
KNOWN_CHUNK = 500  # keys per duplicate lookup (two bound values each; SQLite allows 32,766)


def make_loc(day: int, offset: int) -> int:
    return (day << OFFSET_BITS) | offset


def split_loc(loc: int) -> tuple[int, int]:
    return loc >> OFFSET_BITS, loc & OFFSET_MASK


def uid_key(uid: str) -> bytes | str:
    """A canonical (lower-case) UUID as its 16 bytes; any other uid as it is."""
    if len(uid) == 36 and uid[8] == uid[13] == uid[18] == uid[23] == "-" and uid == uid.lower():
        with contextlib.suppress(ValueError):
            raw = bytes.fromhex(uid.replace("-", ""))  # more dashes (or spaces) leave fewer bytes
            if len(raw) == 16:
                return raw
    return uid


READ_AHEAD = 1024  # most lines are shorter: one read (of one or two pages) each
MAX_LINE = MAX_EVENT_BYTES + 4096  # an event and what the writer adds (ei, hash)


def read_line(fd: int, offset: int) -> bytes | None:
    """The line starting at `offset` (without its newline); None when there is no whole line."""
    size = READ_AHEAD
    while True:
        data = os.pread(fd, size, offset)
        end = data.find(b"\n")
        if end >= 0:
            return data[:end]
        if len(data) < size or size >= MAX_LINE:
            return None
        size *= 4


class IndexWriteError(RuntimeError):
    """The index could not be written (disk full, I/O error); str() names the file."""


@dataclass(frozen=True)
class LastWrite:
    day: int
    end: int  # offset just past the last indexed line (or anchor) of that day's file
    hash: str


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA cache_size=-65536")  # 64 MiB of index pages between searches
        conn.execute("PRAGMA mmap_size=4294967296")  # pages read without a system call each
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-131072")  # 128 MiB: the hot ends of every index stay in memory
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _create(path: Path) -> None:
    # SQLite gives the -wal and -shm files the database file's mode: create it 0640 first.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, INDEX_MODE))
    path.chmod(INDEX_MODE)


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class WriteIndex:
    """The writer's connection. Used from one thread at a time (the batch worker).

    Rows of a batch are staged (`stage`, `set_last`) and written in one transaction
    (`commit`); label and session ids are handed out in memory meanwhile, and
    `forget()` drops them when a batch failed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _create(path)
        self.conn = _connect(path)
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "events" in tables and version != SCHEMA_VERSION:
            log.warning("audit index %s has an older layout (version %d); rebuilding it from the daily files",
                        path, version)
            self.conn.close()
            _remove(path)
            _create(path)
            self.conn = _connect(path)
        self.conn.executescript(SCHEMA)
        self._rows: list[tuple] = []
        self._last: tuple[int, str] | None = None
        self.forget()

    # --- ids ------------------------------------------------------------------------------

    def forget(self) -> None:
        """Drop staged rows and every cached id: re-read what is committed."""
        self._rows = []
        self._last = None
        self._labels: dict[tuple[int, str], int] = {}
        self._new_labels: list[tuple[int, int, str]] = []
        self._sessions: dict[str, list[int]] = {}  # sid -> [id, next_ei]
        self._touched: dict[str, list[int]] = {}
        self._next_label = (self.conn.execute("SELECT MAX(id) FROM labels").fetchone()[0] or 0) + 1
        self._next_session = (self.conn.execute("SELECT MAX(id) FROM sessions").fetchone()[0] or 0) + 1

    def _label(self, kind: int, name: str) -> int:
        key = (kind, name)
        found = self._labels.get(key)
        if found is None:
            row = self.conn.execute("SELECT id FROM labels WHERE kind = ? AND name = ?", key).fetchone()
            if row is None:
                found = self._next_label
                self._next_label += 1
                self._new_labels.append((found, kind, name))
            else:
                found = row[0]
            self._labels[key] = found
        return found

    def _session(self, sid: str) -> list[int]:
        entry = self._sessions.get(sid)
        if entry is None:
            if len(self._sessions) >= 100_000 and not self._touched:
                self._sessions.clear()
            row = self.conn.execute("SELECT id, next_ei FROM sessions WHERE sid = ?", (sid,)).fetchone()
            if row is None:
                entry = [self._next_session, 0]
                self._next_session += 1
            else:
                entry = [row[0], row[1]]
            self._sessions[sid] = entry
        return entry

    def next_ei(self, sid: str) -> int:
        """The ei the session's next event gets; events without a session get 0."""
        return self._session(sid)[1] if sid else 0

    # --- writing --------------------------------------------------------------------------

    def known(self, keys: list[tuple[int, bytes | str]]) -> set[tuple[int, bytes | str]]:
        """Which (time_ms, uid_key) pairs are already indexed."""
        found: set[tuple[int, bytes | str]] = set()
        for i in range(0, len(keys), KNOWN_CHUNK):
            chunk = keys[i : i + KNOWN_CHUNK]
            # The keys as a table probing the index once each (a row-value IN would scan the table).
            sql = (f"WITH k(t, u) AS (VALUES {','.join(['(?,?)'] * len(chunk))}) "
                   "SELECT e.time_ms, e.uid FROM k CROSS JOIN events e ON e.time_ms = k.t AND e.uid = k.u")
            found.update(self.conn.execute(sql, [v for key in chunk for v in key]))
        return found

    def stage(self, loc: int, time_ms: int, uid: bytes | str, event_type: str, user: str, sid: str,
              ei: int) -> None:
        session = self._session(sid)
        if ei + 1 > session[1]:
            session[1] = ei + 1
        self._touched[sid] = session
        self._rows.append((loc, time_ms, uid, self._label(TYPE, event_type), self._label(USER, user),
                           session[0]))

    def set_last(self, day: int, end: int, digest: str) -> None:
        """Everything up to `end` of that day's file is indexed (or an anchor); `digest` is its hash."""
        self._last = (make_loc(day, end), digest)

    def commit(self, ignore_known: bool = False) -> None:
        """Staged rows, ids and the last position in one transaction: after a crash either all
        of a batch is indexed or none. `ignore_known`: skip rows whose uid is there (recovery)."""
        verb = "INSERT OR IGNORE" if ignore_known else "INSERT"
        try:
            with self.conn:
                self.conn.execute("BEGIN")
                if self._new_labels:
                    self.conn.executemany("INSERT INTO labels (id, kind, name) VALUES (?, ?, ?)", self._new_labels)
                if self._touched:
                    self.conn.executemany(
                        "INSERT INTO sessions (id, sid, next_ei) VALUES (?, ?, ?)"
                        " ON CONFLICT (id) DO UPDATE SET next_ei = MAX(next_ei, excluded.next_ei)",
                        [(s[0], sid, s[1]) for sid, s in self._touched.items()],
                    )
                self.conn.executemany(f"{verb} INTO events VALUES (?, ?, ?, ?, ?, ?)", self._rows)
                if self._last is not None:
                    self.conn.execute("INSERT OR REPLACE INTO state (id, loc, hash) VALUES (0, ?, ?)", self._last)
        except sqlite3.Error as exc:  # e.g. "database or disk is full": say which database
            self.forget()
            raise IndexWriteError(f"cannot write the index {self.path}: {exc}") from exc
        self._rows, self._new_labels, self._touched, self._last = [], [], {}, None

    def last_write(self) -> LastWrite | None:
        row = self.conn.execute("SELECT loc, hash FROM state WHERE id = 0").fetchone()
        if row is None:
            return None
        day, end = split_loc(row[0])
        return LastWrite(day, end, row[1])

    # --- retention --------------------------------------------------------------------------

    def remove_days_before(self, day: int, chunk: int = 5000) -> Iterator[int]:
        """Delete the rows of lines in files of days before `day`, `chunk` rows per
        transaction (the writer goes on between them); yields how many each removed."""
        bound = make_loc(day, 0)
        while True:
            try:
                with self.conn:
                    self.conn.execute("BEGIN")
                    removed = self.conn.execute(
                        "DELETE FROM events WHERE loc IN (SELECT loc FROM events WHERE loc < ? ORDER BY loc LIMIT ?)",
                        (bound, chunk),
                    ).rowcount
            except sqlite3.Error as exc:
                raise IndexWriteError(f"cannot remove old rows from the index {self.path}: {exc}") from exc
            if not removed:
                return
            yield removed

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        self.conn.close()


class SearchIndex:
    """A read-only connection for the search endpoint (WAL lets it read while the writer
    writes); lines are read from the daily files the rows point into."""

    def __init__(self, path: Path, files: Callable[[int], Path]) -> None:
        self.conn = _connect(path, readonly=True)
        self._file_of_day = files
        self._lock = threading.Lock()

    def _ids(self, q: SearchQuery) -> SearchIds | None:
        """Label and session ids of the query's names; None when one is unknown (nothing matches)."""
        user = sid = None
        types: tuple[int, ...] = ()
        if q.user:
            row = self.conn.execute("SELECT id FROM labels WHERE kind = ? AND name = ?", (USER, q.user)).fetchone()
            if row is None:
                return None
            user = row[0]
        if q.sid:
            row = self.conn.execute("SELECT id FROM sessions WHERE sid = ?", (q.sid,)).fetchone()
            if row is None:
                return None
            sid = row[0]
        if q.event_types:
            marks = ",".join("?" * len(q.event_types))
            types = tuple(r[0] for r in self.conn.execute(
                f"SELECT id FROM labels WHERE kind = {TYPE} AND name IN ({marks}) ORDER BY id", q.event_types))
            if not types:
                return None
        return SearchIds(user=user, sid=sid, types=types)

    def search(self, q: SearchQuery) -> list[tuple[int, int, bytes]]:
        """(time_ms, loc, line) rows in the query's order; one more than the limit when more match."""
        with self._lock:
            ids = self._ids(q)
            if ids is None:
                return []
            rows = self.conn.execute(*search_sql(q, ids)).fetchall()
        return list(self._read_lines(rows))

    def _read_lines(self, rows: list[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
        fds: dict[int, int | None] = {}
        try:
            for _time_ms, loc in rows:
                day, offset = split_loc(loc)
                if day not in fds:
                    try:
                        fds[day] = os.open(self._file_of_day(day), os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:  # removed by retention after the query: its rows go too
                        fds[day] = None
                if (fd := fds[day]) is not None:
                    # Ask for every line at once: a log not in the page cache is read with many
                    # requests in flight instead of one random read after the other.
                    os.posix_fadvise(fd, offset, READ_AHEAD, os.POSIX_FADV_WILLNEED)
            for time_ms, loc in rows:
                day, offset = split_loc(loc)
                if (fd := fds[day]) is None:
                    continue
                line = read_line(fd, offset)
                if line is None:
                    log.error("audit index: %s has no whole line at byte %d; skipped", self._file_of_day(day), offset)
                else:
                    yield time_ms, loc, line
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)

    def close(self) -> None:
        self.conn.close()
