"""What every kernel record shares on its way to an audit event: the clock, a
stable uid, and the session it belongs to. Pure (reads the boot id once)."""

from __future__ import annotations

import datetime as dt
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


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stable_uid(key: str) -> str:
    """The same record always gets the same uid: a record read again (the enforcer
    died between reading and acknowledging it) is dropped as a duplicate downstream."""
    return str(uuid.uuid5(BOOT_ID, key))


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
