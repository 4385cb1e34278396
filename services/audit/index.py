"""The SQLite index beside the log: which uids are written, where, and their lines for search.

The daily files are the record; the index can be rebuilt from them (see
recovery.py), so it runs with synchronous=NORMAL: a commit lost to a power cut
is re-derived from the (fsynced) files on the next start.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from .core import SearchQuery

INDEX_FILE = "index.sqlite"
INDEX_MODE = 0o640

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY,     -- write order
    uid     TEXT NOT NULL UNIQUE,    -- a redelivered event is found here and skipped
    time_ms INTEGER NOT NULL,        -- the event's own time, for search
    event   TEXT NOT NULL,
    user    TEXT NOT NULL,
    sid     TEXT NOT NULL,
    ei      INTEGER NOT NULL,
    file    TEXT NOT NULL,           -- daily file name
    offset  INTEGER NOT NULL,        -- byte offset of the line in that file
    length  INTEGER NOT NULL,        -- bytes, newline included
    hash    TEXT NOT NULL,
    line    BLOB NOT NULL            -- the line as written (no newline)
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time_ms, seq);
CREATE INDEX IF NOT EXISTS events_by_sid ON events (sid, ei);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user, time_ms);
CREATE INDEX IF NOT EXISTS events_by_type ON events (event, time_ms);
"""


class IndexWriteError(RuntimeError):
    """The index could not be written (disk full, I/O error); str() names the file."""


@dataclass(frozen=True)
class Row:
    uid: str
    time_ms: int
    event: str
    user: str
    sid: str
    ei: int
    file: str
    offset: int
    length: int
    hash: str
    line: bytes


@dataclass(frozen=True)
class LastWrite:
    file: str
    end: int  # offset just past the last indexed line
    hash: str


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class WriteIndex:
    """The writer's connection. Used from one thread at a time (the batch worker)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # SQLite gives the -wal and -shm files the database file's mode, and they
        # hold event lines too: create it 0640 before SQLite creates them.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, INDEX_MODE))
        path.chmod(INDEX_MODE)
        self.conn = _connect(path)
        self.conn.executescript(SCHEMA)

    def known_uids(self, uids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(uids), 500):  # stay under SQLite's bound-parameter limit
            chunk = uids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.conn.execute(f"SELECT uid FROM events WHERE uid IN ({marks})", chunk))
        return found

    def last_ei(self, sid: str) -> int | None:
        return self.conn.execute("SELECT MAX(ei) FROM events WHERE sid = ?", (sid,)).fetchone()[0]

    def last_write(self) -> LastWrite | None:
        r = self.conn.execute("SELECT file, offset + length, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return LastWrite(*r) if r else None

    def insert(self, rows: list[Row], ignore_known: bool = False) -> None:
        """One transaction: after a crash either all of a batch is indexed or none."""
        verb = "INSERT OR IGNORE" if ignore_known else "INSERT"
        try:
            with self.conn:
                self.conn.execute("BEGIN")
                self.conn.executemany(
                    f"{verb} INTO events (uid, time_ms, event, user, sid, ei, file, offset, length, hash, line)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (r.uid, r.time_ms, r.event, r.user, r.sid, r.ei, r.file, r.offset, r.length, r.hash, r.line)
                        for r in rows
                    ],
                )
        except sqlite3.OperationalError as exc:  # e.g. "database or disk is full": say which database
            raise IndexWriteError(f"cannot write the index {self.path}: {exc}") from exc

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        self.conn.close()


class SearchIndex:
    """A read-only connection for the search endpoint (WAL lets it read while the writer writes)."""

    def __init__(self, path: Path) -> None:
        self.conn = _connect(path, readonly=True)
        self._lock = threading.Lock()

    def search(self, q: SearchQuery) -> list[tuple[int, int, bytes]]:
        """(time_ms, seq, line) rows in the requested order; one more than the limit when more match."""
        where: list[str] = []
        params: list[object] = []
        if q.start_ms is not None:
            where.append("time_ms >= ?")
            params.append(q.start_ms)
        if q.end_ms is not None:
            where.append("time_ms < ?")
            params.append(q.end_ms)
        if q.event_types:
            where.append(f"event IN ({','.join('?' * len(q.event_types))})")
            params.extend(q.event_types)
        if q.user:
            where.append("user = ?")
            params.append(q.user)
        if q.sid:
            where.append("sid = ?")
            params.append(q.sid)
        if q.after is not None:
            where.append("(time_ms, seq) < (?, ?)" if q.descending else "(time_ms, seq) > (?, ?)")
            params.extend(q.after)
        order = "DESC" if q.descending else "ASC"
        sql = (
            "SELECT time_ms, seq, line FROM events"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY time_ms {order}, seq {order} LIMIT ?"
        )
        params.append(q.limit + 1)
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()
