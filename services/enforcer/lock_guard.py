"""Locks on this node: refuse matching new sessions, end matching running ones,
and in strict mode lock everyone out while the lock view cannot be trusted.

The lock view is a KV mirror of the locks bucket. It is "current" while the
mirror is caught up and connected; after `max_staleness` without that, sessions
whose locking mode is strict (the cluster default, or any of their roles) are
ended and new ones refused with the original's preventive lock-out message.
best_effort sessions keep being judged by the last locks known.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time

from nats.aio.client import Client

from ringfence import locking
from ringfence.contract import names
from ringfence.contract.api import SessionInfo
from ringfence.contract.events import ClientDisconnect, LockViewStale
from ringfence.contract.resources import ClusterAuthPreference, Lock
from ringfence.runtime.kv_mirror import KvMirror

from .directory import Directory
from .session_manager import SessionManager

log = logging.getLogger(__name__)

STALENESS_CHECK = 0.5


class LockGuard:
    def __init__(self, nc: Client, sessions: SessionManager, directory: Directory, max_staleness: float,
                 emit, counters: dict) -> None:
        self.sessions = sessions
        self.directory = directory
        self.max_staleness = max_staleness
        self.emit = emit
        self.counters = counters
        self.view: KvMirror[Lock] = KvMirror(nc, names.LOCKS_BUCKET, ">", Lock, self._changed, counters)
        self.cap: KvMirror[ClusterAuthPreference] = KvMirror(nc, names.POLICY_BUCKET, names.CAP_KEY,
                                                             ClusterAuthPreference, self._changed, counters)
        self.started = time.monotonic()
        self.cluster_mode = "best_effort"
        self.stale_reported = False
        self._sweep_pending = False
        counters.setdefault("lock_terminations", 0)
        counters.setdefault("lock_view_stale", 0)

    # --- decisions --------------------------------------------------------------------------------------
    def mode(self, info: SessionInfo) -> str:
        roles = [self.directory.role(r) for r in info.roles]
        return locking.locking_mode(self.cluster_mode, [r.spec.options.lock for r in roles if r])

    def view_age(self) -> float:
        """Seconds since the lock view was last confirmed current."""
        return time.monotonic() - (self.view.synced_at or self.started)

    def stale(self) -> bool:
        """The lock view has not been confirmed current for longer than allowed."""
        return self.view_age() > self.max_staleness

    def verdict(self, info: SessionInfo) -> str | None:
        """Why this session may not run, or None."""
        if self.stale() and self.mode(info) == "strict":
            return locking.PREVENTIVE_LOCKOUT
        found = locking.matching_locks(self.view.values.values(), locking.Interaction.of_session(info),
                                       dt.datetime.now(dt.UTC))
        return locking.lock_message(found[0]) if found else None

    async def check(self, info: SessionInfo) -> str | None:
        """Admission check for a new session."""
        return self.verdict(info)

    # --- enforcement ------------------------------------------------------------------------------------
    def _changed(self) -> None:
        self.counters["locks_known"] = len(self.view.values)
        self.counters["locks_changed_ms"] = int(time.time() * 1000)  # wall clock: fleet benchmarks
        cap = self.cap.values.get(names.CAP_KEY)
        mode = cap.spec.locking_mode if cap else "best_effort"
        if mode != self.cluster_mode:
            self.cluster_mode = mode
            log.info("cluster locking mode: %s", mode)
        if not self._sweep_pending:
            self._sweep_pending = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.sweep()))

    async def sweep(self) -> None:
        """End every running session that may no longer run (its whole connection, if it has one)."""
        self._sweep_pending = False
        doomed: dict[str, str] = {}
        for info in list(self.sessions.by_sid.values()):
            reason = self.verdict(info)
            if reason:
                top = info.connection or info.sid
                doomed.setdefault(top, reason)
        await asyncio.gather(*(self._end(sid, reason) for sid, reason in doomed.items()))

    async def _end(self, sid: str, reason: str) -> None:
        info = self.sessions.by_sid.get(sid)
        if info is None or sid in self.sessions.terminating:
            return
        if await self.sessions.terminate(sid, reason):
            self.counters["lock_terminations"] += 1
            self.emit(ClientDisconnect(user=info.user, login=info.login, sid=sid, reason=reason))

    async def watch_staleness(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STALENESS_CHECK)
            if self.stale():
                if not self.stale_reported:
                    self.stale_reported = True
                    self.counters["lock_view_stale"] += 1
                    log.warning("lock view not confirmed for %.0fs: strict-mode sessions are locked out",
                                self.max_staleness)
                    self.emit(LockViewStale(reason=f"lock view not confirmed current for {self.max_staleness:g}s"))
                await self.sweep()
            elif self.stale_reported:
                self.stale_reported = False
                log.info("lock view current again")

    def tasks(self, stop: asyncio.Event) -> list:
        return [self.view.run(stop), self.cap.run(stop), self.watch_staleness(stop)]

