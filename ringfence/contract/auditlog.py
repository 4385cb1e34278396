"""The on-disk audit log format, shared by its writer (services/audit) and its
readers (`ringfence events verify`, SIEM shippers).

Layout of `<data_dir>/log/`:
  YYYY-MM-DD.00:00:00.log   one file per UTC day of writing, one JSON event per line
  events.log                symlink to the current day's file
  rejected.log              messages that were not events (dead letters)

Tamper evidence: every line ends with `,"hash":"<64 hex>"}`. The hash is
sha256(previous line's hash as ASCII hex + this line's bytes with that suffix
replaced by `}`), i.e. exactly the JSON the writer encoded before sealing it.
The chain runs across daily files; the first line ever chains to 64 zeros.
Hashing the exact bytes (no re-encoding) means any reader can verify a line
without knowing the event schema or a JSON canonicalisation.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOG_DIR_NAME = "log"
CURRENT_LINK = "events.log"
REJECTED_FILE = "rejected.log"
GENESIS_HASH = "0" * 64

_DAILY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.00:00:00\.log$")
_SEAL = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_SEAL_LEN = len(b',"hash":"') + 64 + len(b'"}')


def log_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / LOG_DIR_NAME


def daily_file_name(when: dt.datetime) -> str:
    """`2021-07-22.00:00:00.log` for any moment of that UTC day."""
    day = when.astimezone(dt.UTC).date() if when.tzinfo else when.date()
    return f"{day.isoformat()}.00:00:00.log"


def is_daily_file(name: str) -> bool:
    return bool(_DAILY_FILE.match(name))


def daily_files(directory: str | Path) -> list[Path]:
    """The daily files in write order (their names sort by day)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if is_daily_file(p.name) and p.is_file())


def chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def seal(prev_hash: str, body: bytes) -> tuple[bytes, str]:
    """Append the chained hash to a JSON object's bytes: returns (line without newline, hash)."""
    if not body.endswith(b"}"):
        raise ValueError("an event line must be a JSON object")
    digest = chain_hash(prev_hash, body)
    return body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}', digest


def unseal(line: bytes) -> tuple[bytes, str]:
    """Split a sealed line (without its newline) into (hashed body, recorded hash)."""
    m = _SEAL.search(line)
    if not m:
        raise ValueError('line does not end with a "hash" field')
    return line[:-_SEAL_LEN] + b"}", m.group(1).decode("ascii")


@dataclass
class ChainBreak:
    path: Path
    line_no: int  # 1-based
    reason: str


@dataclass
class VerifyResult:
    verified: int
    last_hash: str
    broken: ChainBreak | None = None
    incomplete_tail: Path | None = None  # a last line still being written (no newline yet)


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete?) for each line of a file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            complete = raw.endswith(b"\n")
            yield n, raw.rstrip(b"\n"), complete


def verify_files(paths: Iterable[Path], prev_hash: str = GENESIS_HASH) -> VerifyResult:
    """Check the hash chain through `paths` in order; stop at the first broken line."""
    result = VerifyResult(verified=0, last_hash=prev_hash)
    paths = list(paths)
    for i, path in enumerate(paths):
        for n, line, complete in _lines(path):
            if not complete:
                if i == len(paths) - 1:  # the writer may be mid-line right now
                    result.incomplete_tail = path
                    return result
                result.broken = ChainBreak(path, n, "incomplete line in the middle of the log")
                return result
            try:
                body, recorded = unseal(line)
            except ValueError as exc:
                result.broken = ChainBreak(path, n, str(exc))
                return result
            expected = chain_hash(result.last_hash, body)
            if recorded != expected:
                result.broken = ChainBreak(
                    path, n, "hash does not match: the line was modified, or a line before it was removed or added"
                )
                return result
            result.last_hash = recorded
            result.verified += 1
    return result


def last_line_hash(path: Path) -> str | None:
    """The hash recorded on the last complete line of a file, if any."""
    last: bytes | None = None
    for _n, line, complete in _lines(path):
        if complete and line:
            last = line
    if last is None:
        return None
    try:
        return unseal(last)[1]
    except ValueError:
        return None
