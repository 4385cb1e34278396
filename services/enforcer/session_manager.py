"""Opening, tracking and ending sessions on this node.

A session is a cgroup under the node's tree plus a state file; its processes
inherit the cgroup, so every child of the session is restricted too. Channels
of an SSH connection are cgroups inside the connection's. A session ends when
its cgroup becomes empty (cgroup.events "populated 0", watched with inotify).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from nats.js.kv import KeyValue

from ringfence.contract.api import Notice, OpenSessionRequest, SessionInfo, SessionUpdate
from ringfence.contract.events import (
    AuditEvent,
    SessionEnd,
    SessionJoin,
    SessionLeave,
    SessionRejected,
    SessionStart,
    now_rfc3339,
)

from .cgroups import CgroupTree, PopulatedWatcher
from .key_fingerprint import login_key
from .recorder import Recorder
from .restricted_bpf import RestrictedBPF
from .session_core import Peer, Plan, Refusal, Refused, plan_session
from .session_store import SessionStore

log = logging.getLogger(__name__)

# Checks run before a session opens (locks, limits): a refusal (or its message), or None.
AdmissionCheck = Callable[[SessionInfo], Awaitable[Refusal | str | None]]
# Run when a session ends, or when it could not be opened after the checks passed.
EndHook = Callable[[SessionInfo], Awaitable[None]]
NOTICE_WAIT = 0.5  # at most this long for a wrapper to show a notice before its session ends (its ack
# usually comes within milliseconds; 50 ms proved too short for a loaded 2-core host)
CONNECTION_GRACE = 0.03  # channels go first, so sshd can pass their last words on
KV_ACTIVITY_INTERVAL = 10.0  # how often last_active reaches the fleet-wide listing


@dataclass
class Link:
    """The open socket of a channel's wrapper: notices go out through it."""

    writer: asyncio.StreamWriter
    record: bool = False
    width: int = 0
    height: int = 0
    published_activity: float = field(default=0.0)
    noticed: asyncio.Event = field(default_factory=asyncio.Event)
    last_io: float = field(default_factory=time.monotonic)  # input or output: not idle


class SessionManager:
    def __init__(
        self,
        *,
        tree: CgroupTree,
        bpf: RestrictedBPF,
        store: SessionStore,
        emit: Callable[[AuditEvent], None],
        recorder: Recorder,
        node: dict[str, str],
        flags: int,
        reader_cycles: Callable[[], int],
        counters: dict,
        key_owners: Callable[[], dict],
        roles_of: Callable[[str], list[str]],
    ) -> None:
        self.tree = tree
        self.bpf = bpf
        self.store = store
        self.emit = emit
        self.recorder = recorder
        self.node = node  # cluster_name, server_id, server_hostname
        self.flags = flags
        self.reader_cycles = reader_cycles
        self.counters = counters
        self.key_owners = key_owners
        self.roles_of = roles_of
        self.by_sid: dict[str, SessionInfo] = {}
        self.by_cgroup: dict[int, SessionInfo] = {}
        self.by_path: dict[str, SessionInfo] = {}
        self.links: dict[str, Link] = {}
        self.participants: dict[str, list[str]] = {}  # everyone who took part: owner, then joiners
        self.watching: dict[str, list[str]] = {}  # joiners still watching
        self.checks: list[AdmissionCheck] = []
        self.end_hooks: list[EndHook] = []
        self.terminating: set[str] = set()
        self.kv: KeyValue | None = None
        self.watcher: PopulatedWatcher | None = None
        self._ending: dict[str, asyncio.Task] = {}
        counters["sessions_active"] = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.watcher = PopulatedWatcher(loop, self._on_cgroup_change)

    # --- lookups -----------------------------------------------------------------------
    def lookup_cgroup(self, cgroup_id: int) -> SessionInfo | None:
        return self.by_cgroup.get(cgroup_id)

    def peer(self, pid: int, uid: int, account: str) -> Peer:
        cgroup = self.tree.cgroup_of_pid(pid) or ""
        rel = self.tree.relative(cgroup)
        session = self.by_path.get(rel) if rel else None
        foreign = cgroup if cgroup.startswith("/ringfence/") and session is None else None
        return Peer(pid=pid, uid=uid, account=account, session=session, foreign_session=foreign)

    def channels_of(self, conn_sid: str) -> list[SessionInfo]:
        return [s for s in self.by_sid.values() if s.connection == conn_sid]

    # --- restart ---------------------------------------------------------------------------
    def restore(self) -> list[str]:
        """Take back the sessions a previous enforcer left; return those that ended meanwhile."""
        ended = []
        for info in self.store.load_all():
            self._track(info)
            if self.tree.path(info.cgroup).exists():
                assert self.watcher is not None
                self.watcher.watch(info.sid, self.tree.path(info.cgroup))
                if self.tree.populated(info.cgroup):
                    log.info("took back session %s (user %s, login %s)", info.sid, info.user, info.login)
                    continue
            ended.append(info.sid)
        for rel in self.tree.existing():
            if rel not in self.by_path and not self.tree.populated(rel):
                self.tree.remove(rel)  # created, but no process ever moved in
        # Channels end before their connection.
        return sorted(ended, key=lambda sid: self.by_sid[sid].kind != "channel")

    def _track(self, info: SessionInfo) -> None:
        self.by_sid[info.sid] = info
        self.by_cgroup[info.cgroup_id] = info
        self.by_path[info.cgroup] = info
        self.counters["sessions_active"] = len(self.by_sid)

    # --- open ------------------------------------------------------------------------------
    async def open(self, peer: Peer, req: OpenSessionRequest) -> SessionInfo:
        plan: Plan = plan_session(peer, req, self.key_owners(), self.roles_of)
        sid = str(uuid.uuid4())
        # device / mfa_device locks: the connection's login key; a channel inherits it.
        fingerprint, is_sk = login_key(req.auth_info) if plan.kind == "connection" else (
            (plan.parent.key_fingerprint, plan.parent.key_is_sk) if plan.parent else ("", False))
        info = SessionInfo(
            sid=sid,
            user=plan.user,
            login=plan.login,
            roles=list(plan.roles),
            server_id=self.node["server_id"],
            server_hostname=self.node["server_hostname"],
            cluster_name=self.node["cluster_name"],
            started=now_rfc3339(),
            addr_remote=req.addr_remote or (plan.parent.addr_remote if plan.parent else ""),
            addr_local=req.addr_local or (plan.parent.addr_local if plan.parent else ""),
            command=req.command,
            interactive=req.interactive,
            kind=plan.kind,  # type: ignore[arg-type]
            connection=plan.parent.sid if plan.parent else "",
            cgroup=f"{plan.parent.cgroup}/{sid}" if plan.parent else sid,
            key_id=plan.key_id,
            key_fingerprint=fingerprint,
            key_is_sk=is_sk,
            term=req.term,
        )
        for check in self.checks:
            refusal = await check(info)
            if refusal:
                if isinstance(refusal, str):
                    refusal = Refusal(refusal)
                await self._run_end_hooks(info)  # give back what earlier checks took
                self.emit(SessionRejected(user=info.user, login=info.login, reason=refusal.reason,
                                          max=refusal.max))
                raise Refused(refusal.reason)
        try:
            info.cgroup_id = self.tree.create(info.cgroup)
            self.store.save(info)  # before any process is inside: a restart can always attribute it
            self.bpf.add_session(info.cgroup_id, self.flags)
            assert self.watcher is not None
            self.watcher.watch(sid, self.tree.path(info.cgroup))
            self._track(info)
            self.tree.move(info.cgroup, plan.pid)
        except Exception as exc:
            self._forget(info)
            await self._run_end_hooks(info)
            raise Refused(f"cannot place process {plan.pid} in a session cgroup: {exc}") from exc
        self.emit(
            SessionStart(
                user=info.user,
                login=info.login,
                sid=sid,
                addr_remote=info.addr_remote,
                addr_local=info.addr_local,
                pid=plan.pid,
                cgroup_id=info.cgroup_id,
                roles=info.roles,
                initial_command=info.command,
                interactive=info.interactive,
                kind=info.kind,
                connection=info.connection,
                proto="ssh" if info.kind != "local" else "local",
            )
        )
        await self._publish_info(info)
        log.info("session %s opened: %s, user %s, login %s, pid %d, roles %s", sid, info.kind, info.user, info.login,
                 plan.pid, ",".join(info.roles) or "-")
        return info

    def attach_link(self, info: SessionInfo, writer: asyncio.StreamWriter, req: OpenSessionRequest) -> Link:
        """A channel's wrapper keeps its socket open; interactive ones are recorded."""
        link = Link(writer=writer, record=req.interactive, width=req.width, height=req.height)
        self.links[info.sid] = link
        if link.record:
            self.recorder.begin(info, req.width or 80, req.height or 24, req.term)
        return link

    def on_update(self, sid: str, update: SessionUpdate) -> None:
        info = self.by_sid.get(sid)
        link = self.links.get(sid)
        if info is None or link is None:
            return
        if update.noticed:
            link.noticed.set()
        if any(code in ("i", "o") for _, code, _ in update.events):
            info.last_active = now_rfc3339()
            now = link.last_io = time.monotonic()
            if now - link.published_activity > KV_ACTIVITY_INTERVAL:
                link.published_activity = now
                asyncio.get_running_loop().create_task(self._publish_info(info))
        if link.record and update.events:
            self.recorder.add(sid, update.events)

    def join(self, sid: str, user: str) -> bool:
        info = self.by_sid.get(sid)
        if info is None:
            return False
        self.participants.setdefault(sid, [info.user])
        if user not in self.participants[sid]:
            self.participants[sid].append(user)
        self.watching.setdefault(sid, []).append(user)
        self.emit(SessionJoin(user=user, login=info.login, sid=sid))
        return True

    def leave(self, sid: str, user: str) -> None:
        """A watcher left; at the session's end, everyone still watching leaves (see end())."""
        info = self.by_sid.get(sid)
        watching = self.watching.get(sid, [])
        if info is not None and user in watching:
            watching.remove(user)
            self.emit(SessionLeave(user=user, login=info.login, sid=sid))

    def detach_link(self, sid: str) -> None:
        self.links.pop(sid, None)

    # --- end -------------------------------------------------------------------------------
    def _on_cgroup_change(self, sid: str) -> None:
        info = self.by_sid.get(sid)
        if info and sid not in self._ending and not self.tree.populated(info.cgroup):
            task = asyncio.get_running_loop().create_task(self.end(sid))
            task.add_done_callback(_log_failure)

    async def end(self, sid: str) -> None:
        if sid in self._ending:
            await asyncio.shield(self._ending[sid])
            return
        task = asyncio.current_task()
        assert task is not None
        self._ending[sid] = task
        info = self.by_sid.get(sid)
        if info is None:
            self._ending.pop(sid, None)
            return
        for channel in self.channels_of(sid):
            await self.end(channel.sid)
        # The ring buffer may still hold this session's last records: let the
        # reader finish two rounds so they are attributed and precede session.end.
        target = self.reader_cycles() + 2
        for _ in range(50):
            if self.reader_cycles() >= target:
                break
            await asyncio.sleep(0.05)
        self.recorder.finish(sid)
        for watcher in list(self.watching.get(sid, [])):
            self.leave(sid, watcher)
        self.watching.pop(sid, None)
        self.emit(
            SessionEnd(
                user=info.user,
                login=info.login,
                sid=sid,
                participants=self.participants.pop(sid, [info.user]),
                session_start=info.started,
                session_stop=now_rfc3339(),
                interactive=info.interactive,
            )
        )
        self._forget(info)
        await self._run_end_hooks(info)
        if self.kv:
            with contextlib.suppress(Exception):
                await self.kv.delete(sid)
        log.info("session %s ended", sid)

    async def _run_end_hooks(self, info: SessionInfo) -> None:
        for hook in self.end_hooks:
            try:
                await hook(info)
            except Exception:
                log.exception("end hook for session %s failed", info.sid)

    def _forget(self, info: SessionInfo) -> None:
        if self.watcher:
            self.watcher.forget(info.sid)
        self.bpf.remove_session(info.cgroup_id)
        self.tree.remove(info.cgroup)
        self.store.delete(info.sid)
        self.by_sid.pop(info.sid, None)
        self.by_cgroup.pop(info.cgroup_id, None)
        self.by_path.pop(info.cgroup, None)
        self.links.pop(info.sid, None)
        self._ending.pop(info.sid, None)
        self.terminating.discard(info.sid)
        self.counters["sessions_active"] = len(self.by_sid)

    async def terminate(self, sid: str, message: str) -> bool:
        """Tell the user why (where a wrapper listens), then kill every process of
        the session; a connection's channels go first so sshd can deliver the message."""
        info = self.by_sid.get(sid)
        if info is None:
            return False
        if sid in self.terminating:
            return True
        self.terminating.add(sid)
        channels = self.channels_of(sid)
        waits = [self._tell(s.sid, message) for s in (info, *channels) if s.sid in self.links]
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=NOTICE_WAIT)
        for channel in channels:
            self.tree.kill(channel.cgroup)
        if channels:
            await asyncio.sleep(CONNECTION_GRACE)
        self.tree.kill(info.cgroup)
        log.info("session %s terminated: %s", sid, message)
        return True

    async def _tell(self, sid: str, message: str) -> None:
        link = self.links[sid]
        link.noticed.clear()
        with contextlib.suppress(Exception):
            link.writer.write(msgspec.json.encode(Notice(message=message)) + b"\n")
            await link.writer.drain()
            await link.noticed.wait()

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
