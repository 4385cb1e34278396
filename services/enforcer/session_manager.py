"""Opening, tracking and ending sessions on this node.

A session is a cgroup under the node's tree plus a state file; its processes
inherit the cgroup, so every child of the session is restricted too. The end
of a session is the moment its cgroup becomes empty (cgroup.events
"populated 0", watched with inotify).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from nats.js.kv import KeyValue

from ringfence.contract.api import OpenSessionRequest, SessionInfo
from ringfence.contract.events import AuditEvent, SessionEnd, SessionStart, now_rfc3339

from .cgroups import CgroupTree, PopulatedWatcher
from .restricted_bpf import RestrictedBPF
from .session_core import Identity, Peer, Refused, resolve_identity
from .session_store import SessionStore

log = logging.getLogger(__name__)

# Checks run before a session opens (locks, limits): return a refusal message or None.
AdmissionCheck = Callable[[SessionInfo], Awaitable[str | None]]


class SessionManager:
    def __init__(
        self,
        *,
        tree: CgroupTree,
        bpf: RestrictedBPF,
        store: SessionStore,
        emit: Callable[[AuditEvent], None],
        node: dict[str, str],
        flags: int,
        reader_cycles: Callable[[], int],
        counters: dict,
    ) -> None:
        self.tree = tree
        self.bpf = bpf
        self.store = store
        self.emit = emit
        self.node = node  # cluster_name, server_id, server_hostname
        self.flags = flags
        self.reader_cycles = reader_cycles
        self.counters = counters
        self.by_sid: dict[str, SessionInfo] = {}
        self.by_cgroup: dict[int, SessionInfo] = {}
        self.checks: list[AdmissionCheck] = []
        self.kv: KeyValue | None = None
        self.watcher: PopulatedWatcher | None = None
        self._ending: set[str] = set()
        counters["sessions_active"] = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.watcher = PopulatedWatcher(loop, self._on_cgroup_change)

    # --- restart ---------------------------------------------------------------------
    def restore(self) -> list[str]:
        """Take back the sessions a previous enforcer left; return those that ended meanwhile."""
        ended = []
        known = set()
        for info in self.store.load_all():
            known.add(info.sid)
            self._track(info)
            if self.tree.path(info.sid).exists():
                assert self.watcher is not None
                self.watcher.watch(info.sid, self.tree.path(info.sid))
                if self.tree.populated(info.sid):
                    log.info("took back session %s (user %s, login %s)", info.sid, info.user, info.login)
                    continue
            ended.append(info.sid)
        for sid in self.tree.existing():
            if sid not in known and not self.tree.populated(sid):
                self.tree.remove(sid)  # created, but no process ever moved in
        return ended

    def _track(self, info: SessionInfo) -> None:
        self.by_sid[info.sid] = info
        self.by_cgroup[info.cgroup_id] = info
        self.counters["sessions_active"] = len(self.by_sid)

    def lookup_cgroup(self, cgroup_id: int) -> SessionInfo | None:
        return self.by_cgroup.get(cgroup_id)

    # --- open ------------------------------------------------------------------------
    async def open(self, peer: Peer, req: OpenSessionRequest) -> SessionInfo:
        ident: Identity = resolve_identity(peer, req)
        sid = str(uuid.uuid4())
        info = SessionInfo(
            sid=sid,
            user=ident.user,
            login=ident.login,
            server_id=self.node["server_id"],
            server_hostname=self.node["server_hostname"],
            cluster_name=self.node["cluster_name"],
            started=now_rfc3339(),
            addr_remote=req.addr_remote,
            addr_local=req.addr_local,
            command=req.command,
            interactive=req.interactive,
        )
        for check in self.checks:
            refusal = await check(info)
            if refusal:
                raise Refused(refusal)
        info.cgroup_id = self.tree.create(sid)
        try:
            self.store.save(info)  # before any process is inside: a restart can always attribute it
            self.bpf.add_session(info.cgroup_id, self.flags)
            assert self.watcher is not None
            self.watcher.watch(sid, self.tree.path(sid))
            self._track(info)
            self.tree.move(sid, peer.pid)
        except Exception as exc:
            self._forget(info)
            raise Refused(f"cannot place process {peer.pid} in a session cgroup: {exc}") from exc
        self.emit(
            SessionStart(
                user=info.user,
                login=info.login,
                sid=sid,
                addr_remote=info.addr_remote,
                addr_local=info.addr_local,
                pid=peer.pid,
                cgroup_id=info.cgroup_id,
                roles=info.roles,
                initial_command=info.command,
                interactive=info.interactive,
            )
        )
        await self._publish_info(info)
        log.info("session %s opened: user %s, login %s, pid %d", sid, info.user, info.login, peer.pid)
        return info

    # --- end -------------------------------------------------------------------------
    def _on_cgroup_change(self, sid: str) -> None:
        if sid in self.by_sid and sid not in self._ending and not self.tree.populated(sid):
            self._ending.add(sid)
            task = asyncio.get_running_loop().create_task(self.end(sid))
            task.add_done_callback(_log_failure)

    async def end(self, sid: str) -> None:
        info = self.by_sid.get(sid)
        if info is None:
            return
        # The ring buffer may still hold this session's last records: let the
        # reader finish two rounds so they are attributed and precede session.end.
        target = self.reader_cycles() + 2
        for _ in range(50):
            if self.reader_cycles() >= target:
                break
            await asyncio.sleep(0.05)
        self.emit(
            SessionEnd(
                user=info.user,
                login=info.login,
                sid=sid,
                participants=[info.user],
                session_start=info.started,
                session_stop=now_rfc3339(),
                interactive=info.interactive,
            )
        )
        self._forget(info)
        if self.kv:
            with contextlib.suppress(Exception):
                await self.kv.delete(sid)
        log.info("session %s ended", sid)

    def _forget(self, info: SessionInfo) -> None:
        if self.watcher:
            self.watcher.forget(info.sid)
        self.bpf.remove_session(info.cgroup_id)
        self.tree.remove(info.sid)
        self.store.delete(info.sid)
        self.by_sid.pop(info.sid, None)
        self.by_cgroup.pop(info.cgroup_id, None)
        self._ending.discard(info.sid)
        self.counters["sessions_active"] = len(self.by_sid)

    def kill(self, sid: str) -> bool:
        if sid not in self.by_sid:
            return False
        self.tree.kill(sid)
        return True

    async def _publish_info(self, info: SessionInfo) -> None:
        if self.kv is None:
            return
        try:
            await self.kv.put(info.sid, msgspec.json.encode(info))
        except Exception as exc:  # the listing is best effort; the session is already enforced
            log.warning("cannot publish session %s to the sessions bucket: %s", info.sid, exc)

    async def publish_all(self) -> None:
        for info in list(self.by_sid.values()):
            await self._publish_info(info)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception():
        log.error("ending a session failed", exc_info=task.exception())
