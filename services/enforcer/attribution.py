"""Who a kernel record belongs to, also after its session ended.

A record is read from the ring buffer some time after the kernel wrote it; in
a flood, after its session ended. Ended sessions are therefore kept here, by
cgroup id, for ENDED_TTL seconds (at most ENDED_MAX of them, oldest first
out), so a late record still carries its user, login, sid and server. Records
of restricted logins outside sessions are attributed to the login by uid
(a name from the host's account database, root-provided).
"""

from __future__ import annotations

import pwd
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ringfence.contract.api import SessionInfo

ENDED_TTL = 600.0
ENDED_MAX = 10_000


class Attribution:
    def __init__(self, live: Callable[[int], SessionInfo | None], *, ttl: float = ENDED_TTL,
                 max_ended: int = ENDED_MAX, clock: Callable[[], float] = time.monotonic) -> None:
        self._live = live
        self._ttl = ttl
        self._max = max_ended
        self._clock = clock
        self._ended: OrderedDict[int, tuple[float, SessionInfo]] = OrderedDict()
        self._logins: dict[int, str] = {}
        self._lock = threading.Lock()  # the reader threads look up while the event loop remembers

    def running(self, cgroup_id: int) -> bool:
        return self._live(cgroup_id) is not None

    def session(self, cgroup_id: int) -> SessionInfo | None:
        """The running session of `cgroup_id`, or one that ended at most ttl seconds ago."""
        info = self._live(cgroup_id)
        if info is not None:
            return info
        with self._lock:
            entry = self._ended.get(cgroup_id)
        return entry[1] if entry else None

    def ended(self, info: SessionInfo) -> None:
        """`info` ended: keep attributing its cgroup's records for a while."""
        now = self._clock()
        with self._lock:
            self._ended[info.cgroup_id] = (now, info)
            self._ended.move_to_end(info.cgroup_id)
            while self._ended:
                oldest_at, _ = next(iter(self._ended.values()))
                if len(self._ended) <= self._max and now - oldest_at <= self._ttl:
                    break
                self._ended.popitem(last=False)

    def login(self, uid: int) -> str:
        """The login name of `uid` ("" when the host has none)."""
        name = self._logins.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = ""
            self._logins[uid] = name
        return name
