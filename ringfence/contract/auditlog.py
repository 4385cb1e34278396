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

Anchors: the writer begins every daily file with an anchor line, itself part of
the chain, that names the file and the hash of the line before it (the previous
day's last line; 64 zeros for the first file ever):

  {"event":"audit.chain_anchor","ei":0,"uid":"<uuid5 of file and prev_hash>","code":"RF1100I",
   "time":"2021-07-23T00:00:00.000Z","cluster_name":"","user":"","login":"","sid":"",
   "namespace":"default","server_id":"","server_hostname":"","file":"2021-07-23.00:00:00.log",
   "prev_hash":"<64 hex>","hash":"<64 hex>"}

So a file verifies on its own, and when retention removes the oldest days the
chain restarts at the oldest remaining file's anchor; removing or changing a day
in the middle still breaks it (its successor's anchor names another hash).
Anchors are no events: they are not indexed, searched or published, and no
publisher can write one (audit.chain_anchor is no event type).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

LOG_DIR_NAME = "log"
CURRENT_LINK = "events.log"
REJECTED_FILE = "rejected.log"
GENESIS_HASH = "0" * 64

_DAILY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.00:00:00\.log$")
_SEAL = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_SEAL_LEN = len(b',"hash":"') + 64 + len(b'"}')


ANCHOR_EVENT = "audit.chain_anchor"
ANCHOR_CODE = "RF1100I"
_ANCHOR_PREFIX = b'{"event":"%s",' % ANCHOR_EVENT.encode()


class ChainAnchor(msgspec.Struct):
    event: str
    time: str
    file: str
    prev_hash: str
    hash: str = ""


_anchor_decoder = msgspec.json.Decoder(ChainAnchor)


def anchor_line(file_name: str, prev_hash: str) -> tuple[bytes, str]:
    """The sealed anchor that begins daily file `file_name`: (line without newline, its hash).
    It has the fields every event has (empty where they mean nothing), so that readers of
    events.log that expect them need no exception; its uid is derived from what it says."""
    body = msgspec.json.encode({
        "event": ANCHOR_EVENT, "ei": 0,
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"ringfence-chain-anchor:{file_name}:{prev_hash}")),
        "code": ANCHOR_CODE, "time": f"{file_name[:10]}T00:00:00.000Z",
        "cluster_name": "", "user": "", "login": "", "sid": "", "namespace": "default", "server_id": "",
        "server_hostname": "", "file": file_name, "prev_hash": prev_hash,
    })
    return seal(prev_hash, body)


def parse_anchor(line: bytes) -> ChainAnchor | None:
    """The anchor in `line`, or None when it is an event line (or not JSON)."""
    if not line.startswith(_ANCHOR_PREFIX):
        return None
    try:
        return _anchor_decoder.decode(line)
    except msgspec.DecodeError:
        return None


def day_start(file_name: str) -> dt.date:
    """The UTC day a daily file holds."""
    return dt.date.fromisoformat(file_name[:10])


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
    verified: int  # event lines (anchors not counted)
    last_hash: str
    broken: ChainBreak | None = None
    incomplete_tail: Path | None = None  # a last line still being written (no newline yet)
    # The anchor the chain starts at when the lines before it are not there (removed by retention).
    starts_at: ChainAnchor | None = None


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete?) for each line of a file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            complete = raw.endswith(b"\n")
            yield n, raw.rstrip(b"\n"), complete


def _check_anchor(path: Path, anchor: ChainAnchor, prev_hash: str | None) -> str | None:
    if is_daily_file(path.name) and anchor.file != path.name:
        return f"the anchor names file {anchor.file}: the file was renamed or copied"
    if prev_hash is not None and anchor.prev_hash != prev_hash:
        return (f"the anchor says the line before it has hash {anchor.prev_hash}, but the line before it has "
                f"{prev_hash}: a day before this one was removed or changed")
    return None


def verify_files(paths: Iterable[Path], prev_hash: str | None = None) -> VerifyResult:
    """Check the hash chain through `paths` in order; stop at the first broken line.

    `prev_hash` is the hash of the line before the first file; None when unknown:
    then the chain starts at the first file's anchor (or 64 zeros for a file without one)."""
    result = VerifyResult(verified=0, last_hash=prev_hash or GENESIS_HASH)
    running = prev_hash
    paths = list(paths)
    for i, path in enumerate(paths):
        for n, line, complete in _lines(path):
            if not complete:
                if i == len(paths) - 1:  # the writer may be mid-line right now
                    result.incomplete_tail = path
                    return result
                result.broken = ChainBreak(path, n, "incomplete line in the middle of the log")
                return result
            anchor = parse_anchor(line) if n == 1 else None
            if anchor is not None:
                if problem := _check_anchor(path, anchor, running):
                    result.broken = ChainBreak(path, n, problem)
                    return result
                if running is None and anchor.prev_hash != GENESIS_HASH:
                    result.starts_at = anchor
                running = anchor.prev_hash
            try:
                body, recorded = unseal(line)
            except ValueError as exc:
                result.broken = ChainBreak(path, n, str(exc))
                return result
            expected = chain_hash(running or GENESIS_HASH, body)
            if recorded != expected:
                result.broken = ChainBreak(
                    path, n, "hash does not match: the line was modified, or a line before it was removed or added"
                )
                return result
            running = result.last_hash = recorded
            if anchor is None:
                result.verified += 1
    return result


def event_lines(path: Path) -> list[bytes]:
    """The event lines of a daily file (without newlines), its anchor left out."""
    lines = Path(path).read_bytes().splitlines()
    if lines and parse_anchor(lines[0]) is not None:
        del lines[0]
    return lines


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
