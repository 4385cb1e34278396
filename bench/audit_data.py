"""Synthetic audit events for `python -m bench audit`: a fleet's day, reproducible.

Events come in stream order with stream timestamps spread evenly over `days`; every
block of 5,000 events has 50 sessions open at once (100 events each), each session
belongs to one of `users` users; types are weighted like a busy fleet (mostly kernel
events). Lines are built from a template (not msgspec Structs) so that making them
costs little next to writing them.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass

from ringfence.contract import names
from ringfence.contract.events import EVENT_TYPES, encode_event
from services.audit.writer import Incoming

DAY_MS = 86_400_000
SERVER_ID = "4951c001-8dad-4e21-abb6-c03f69b72d2e"  # the node every event comes from
START = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
SESSIONS_PER_BLOCK = 50
EVENTS_PER_SESSION = 100
BLOCK = SESSIONS_PER_BLOCK * EVENTS_PER_SESSION
TYPES = [("session.network", 80), ("session.command", 10), ("session.disk", 8), ("exec", 1), ("session.start", 1)]


@dataclass(frozen=True)
class Fleet:
    total: int
    days: int = 5
    users: int = 1000
    seed: int = 1

    @property
    def start_ms(self) -> int:
        return int(START.timestamp() * 1000)

    def time_ms(self, i: int) -> int:
        return self.start_ms + i * self.days * DAY_MS // self.total

    def sid(self, i: int) -> str:
        return self.sid_of(self.session(i))

    def session(self, i: int) -> int:
        return (i // BLOCK) * SESSIONS_PER_BLOCK + i % SESSIONS_PER_BLOCK

    def sid_of(self, session: int) -> str:
        return str(uuid.UUID(int=(self.seed << 80) | session, version=4))

    def user(self, sid: str) -> str:
        return f"user{int(sid[-6:], 16) % self.users:04d}@example.com"

    def sessions(self) -> int:
        return (self.total + BLOCK - 1) // BLOCK * SESSIONS_PER_BLOCK


FIELDS = {  # what the kernel events carry, for lines of a realistic size
    "session.network": {"program": "curl", "pid": 31926, "cgroup_id": 10863, "src_addr": "10.0.0.5",
                        "dst_addr": "10.1.2.3", "dst_port": 443},
    "session.command": {"program": "bash", "pid": 31926, "path": "/usr/bin/curl",
                        "argv": ["curl", "-s", "https://example.com/api/v1/items?page=2"]},
    "session.disk": {"program": "cat", "pid": 31926, "path": "/etc/ssl/certs/ca-certificates.crt"},
}


def _template(event_type: str) -> bytes:
    """The encoded event with %s where uid, time, user and sid go."""
    sample = EVENT_TYPES[event_type](uid="UID", time="TIME", user="USER", login="ubuntu", sid="SID",
                                     cluster_name="bench", server_id=SERVER_ID,
                                     server_hostname="node-17", **FIELDS.get(event_type, {}))
    line = encode_event(sample).replace(b"%", b"%%")
    for name in (b"UID", b"TIME", b"USER", b"SID"):
        line = line.replace(b'"' + name + b'"', b'"%s"')
    return line


class Generator:
    """Encoded events of `fleet`, in batches of Incoming messages (as the consumer hands them on)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.rng = random.Random(fleet.seed)
        self.templates = {t: _template(t) for t, _w in TYPES}
        self.choices = [t for t, w in TYPES for _ in range(w)]
        self._second = -1
        self._prefix = ""
        self._sids: dict[int, str] = {}

    def event_type(self, i: int) -> str:
        return self.choices[(((i * 2654435761) & 0xFFFFFFFF) >> 16) % len(self.choices)]  # well mixed

    def _time(self, t: int) -> str:
        second = t // 1000
        if second != self._second:
            self._second = second
            self._prefix = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{t % 1000:03d}Z"

    def line(self, i: int) -> tuple[bytes, str, int]:
        f = self.fleet
        t = f.time_ms(i)
        session = f.session(i)
        sid = self._sids.get(session)
        if sid is None:
            if len(self._sids) > 10_000:
                self._sids.clear()
            sid = self._sids[session] = f.sid_of(session)
        h = f"{self.rng.getrandbits(128):032x}"
        uid = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"
        kind = self.event_type(i)
        data = self.templates[kind] % (uid.encode(), self._time(t).encode(), f.user(sid).encode(), sid.encode())
        return data, kind, t

    def batch(self, first: int, count: int) -> list[Incoming]:
        out = []
        for i in range(first, min(self.fleet.total, first + count)):
            data, kind, t = self.line(i)
            out.append(Incoming(data, names.audit_subject(SERVER_ID, kind), i + 1, t))
        return out
