"""Kernel records to spooled audit events: attributed, a batch at a time, and
folded into per-session summaries above capacity.

The ring-buffer readers hand over everything they read in one round (a list);
each list becomes one spool write. While the spool holds more than FOLD_ABOVE
bytes not yet delivered (the audit trail is not keeping up: a flood), records
are counted per session and source (folding.py) instead of written one by one,
until the backlog is below FOLD_BELOW again; the summaries are written before
the events that follow them, every REPORT_INTERVAL, and when their session ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ringfence.contract.api import SessionInfo
from ringfence.contract.events import AuditEvent, EventsLost, encode_event

from .attribution import Attribution
from .folding import Folder
from .kernel import Kernel
from .netevents import NetRecord, destination
from .netevents import to_event as network_event
from .recording_events import CommandRecord, DiskRecord, command_event, disk_event
from .records import stable_uid
from .spool import Spool

log = logging.getLogger(__name__)

FOLD_ABOVE = 32 << 20
FOLD_BELOW = 8 << 20
DRAIN_WAIT = 30.0  # at most this long for the readers to finish their rounds at a session's end


class KernelEvents:
    def __init__(self, spool: Spool, stamp: Callable[[AuditEvent], AuditEvent], attribution: Attribution,
                 counters: dict, reader_cycles: Callable[[], int], *, fold_above: int = FOLD_ABOVE,
                 fold_below: int = FOLD_BELOW) -> None:
        self.spool = spool
        self.fold_above, self.fold_below = fold_above, fold_below
        self.stamp = stamp
        self.attribution = attribution
        self.counters = counters
        self.reader_cycles = reader_cycles
        self.folder = Folder()
        self.folding = False
        self._lock = threading.Lock()  # two reader threads and the event loop share the folder
        for key in ("network_events", "command_events", "disk_events", "unattributed_events",
                    "outside_session_events", "folded_events"):
            counters.setdefault(key, 0)

    # --- called on the reader threads ------------------------------------------------------
    def on_network(self, records: list[NetRecord]) -> None:
        self._handle("network", records, network_event, destination)

    def on_commands(self, records: list[CommandRecord]) -> None:
        self._handle("command", records, command_event, lambda r: r.path)

    def on_disks(self, records: list[DiskRecord]) -> None:
        self._handle("disk", records, disk_event, lambda r: r.path)

    def _handle(self, source: str, records: list[Any], convert: Callable[..., AuditEvent],
                target: Callable[[Any], str]) -> None:
        counters = self.counters
        events = sum(r.opens for r in records) if source == "disk" else len(records)  # disk: folded repeats
        counters[f"{source}_events"] += events
        fold_source = "exec" if source == "command" else source  # EventsLost/EventsFolded source names
        with self._lock:
            fold = self._over_capacity()
            lines = [] if fold else self._folded_lines()
            unattributed = 0
            for rec in records:
                outside = getattr(rec, "subject", 1) == 2
                if outside:
                    counters["outside_session_events"] += 1
                    session, login = None, self.attribution.login(rec.uid)
                else:
                    session, login = self.attribution.session(rec.cgroup_id), ""
                    unattributed += session is None
                if fold:
                    key = (fold_source, 0, rec.uid) if outside else (fold_source, rec.cgroup_id, 0)
                    if source == "disk" and rec.repeats:
                        self.folder.add(key, session, login, rec.wall_time, target(rec), rec.repeats,
                                        rec.first_wall_time)
                    else:
                        self.folder.add(key, session, login, rec.wall_time, target(rec))
                    continue
                event = convert(rec, session, login) if outside else convert(rec, session)
                lines.append(encode_event(self.stamp(event)))
            if fold:
                counters["folded_events"] += events
        if unattributed:
            counters["unattributed_events"] += unattributed
            log.warning("%d %s records from cgroups that are no known session", unattributed, source)
        if lines:
            self.spool.append_many(lines)

    def _over_capacity(self) -> bool:
        backlog = self.spool.pending_bytes()
        was = self.folding
        self.folding = backlog > (self.fold_below if was else self.fold_above)
        if self.folding != was:
            log.warning("audit trail %s: %d bytes of events wait in the spool; kernel records are %s",
                        "behind" if self.folding else "caught up", backlog,
                        "counted per session instead of written one by one" if self.folding else
                        "written one by one again")
        return self.folding

    def _folded_lines(self, cgroup_id: int | None = None) -> list[bytes]:
        return [encode_event(self.stamp(ev)) for ev in self.folder.take(cgroup_id)] if len(self.folder) else []

    # --- called on the event loop --------------------------------------------------------------
    def flush_folds(self, cgroup_id: int | None = None) -> None:
        """Write the summaries kept so far (all, or one session's)."""
        with self._lock:
            lines = self._folded_lines(cgroup_id)
        if lines:
            self.spool.append_many(lines)

    async def drained(self, info: SessionInfo) -> None:
        """Return once every kernel record of the ended session `info` is in the spool:
        the readers finished two full rounds after this call (so they read everything
        the kernel wrote before it) and its summary, if any, is written. The session
        flow calls it just before writing session.end."""
        target = self.reader_cycles() + 2
        deadline = time.monotonic() + DRAIN_WAIT
        while self.reader_cycles() < target and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.flush_folds(info.cgroup_id)

    # --- drops ---------------------------------------------------------------------------------
    def report_losses(self, kernel: Kernel, emit: Callable[[AuditEvent], None]) -> int:
        """One round of turning the kernel's per-session drop counters into audit
        events: one audit.events_lost per session (or login outside sessions) and
        source whose count grew, naming it. What was reported is kept in the pinned
        maps, so another enforcer of this node (a restart, another data dir)
        reports only what is new. Returns how many were reported."""
        unreported, settled = kernel.lost_unreported()
        # Counters of sessions that ended, all reported: their cgroup ids may be reused.
        kernel.forget_lost([key for key in settled if key[1] and not self.attribution.running(key[1])])
        for (source, cgroup_id, uid), total, before in unreported:
            event = EventsLost(uid=stable_uid(f"lost:{source}:{cgroup_id}:{uid}:{total}"), source=source,
                               lost=total - before, total=total)
            if cgroup_id:
                session = self.attribution.session(cgroup_id)
                if session:
                    event.sid, event.user, event.login = session.sid, session.user, session.login
            else:
                event.login = self.attribution.login(uid)
            emit(event)  # before marking it reported: a crash between repeats the same uid
            kernel.mark_lost_reported((source, cgroup_id, uid), total)
            log.warning("%d %s records lost (session %s, login %s): the ring buffer was full; "
                        "raise ssh_service.enhanced_recording.ring_buffer_kib", total - before, source,
                        event.sid or "-", event.login or "-")
        return len(unreported)
