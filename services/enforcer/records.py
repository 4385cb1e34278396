"""What every kernel record shares on its way to an audit event: the clock, a
stable uid, and the session it belongs to. Pure (reads the boot id once)."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
import uuid
from pathlib import Path

from ringfence.contract.api import SessionInfo
from ringfence.contract.events import AuditEvent

BOOT_ID = uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip())


def boot_offset() -> float:
    """Seconds to add to CLOCK_BOOTTIME to get wall time (read the clocks once per batch or record)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def wall_time(boot_ns: int, offset: float) -> float:
    return offset + boot_ns / 1e9


def c_text(raw: bytes) -> str:
    """A NUL-terminated string of a record as text (bytes that are not UTF-8 escaped)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


_second: list = [None, ""]  # the last whole second formatted: records come in bursts


def rfc3339(ts: float) -> str:
    """2021-07-22T22:24:14.984Z (UTC, milliseconds)."""
    ms = int(ts * 1000)
    sec, frac = divmod(ms, 1000)
    if _second[0] != sec:
        _second[1] = dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = sec
    return f"{_second[1]}.{frac:03d}Z"


_UID_BASE = hashlib.sha1(BOOT_ID.bytes)


def stable_uid(key: str) -> str:
    """The same record always gets the same uid (uuid5 of `key` in this boot's
    namespace): a record read again (the enforcer died between reading and
    acknowledging it) is dropped as a duplicate downstream."""
    h = _UID_BASE.copy()
    h.update(key.encode())
    x = h.hexdigest()
    variant = "89ab"[int(x[16], 16) & 3]
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{variant}{x[17:20]}-{x[20:32]}"


def attribute(ev: AuditEvent, session: SessionInfo | None) -> AuditEvent:
    """Fill in who and where from the session the record's cgroup belongs to."""
    if session:
        ev.sid = session.sid
        ev.user = session.user
        ev.login = session.login
        ev.cluster_name = session.cluster_name
        ev.server_id = session.server_id
        ev.server_hostname = session.server_hostname
    return ev
