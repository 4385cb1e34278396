"""Opening, tracking and ending sessions on this node.

A session is a cgroup under the node's tree plus a state file; its processes
inherit the cgroup, so every child of the session is restricted too. Channels
of an SSH connection are cgroups inside the connection's. A session that runs
a program (a channel, or `ringfence run`) has a root relay that runs it
(ringfence/hooks/relay.py); its journal is followed here (relays.py) into
audit events and the recording. A session ends when its cgroup is empty
(cgroup.events "populated 0", watched with inotify) and its relay has
written its last line.

One SSH login is one session: the channel writes session.start and
session.end; the connection carries the facts its channels inherit and
writes none of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from nats.js.kv import KeyValue

from ringfence.contract import names
from ringfence.contract import relay as wire
from ringfence.contract.api import OpenSessionReply, OpenSessionRequest, SessionInfo
from ringfence.contract.events import (
    SFTP,
    AuditEvent,
    ClientDisconnect,
    Exec,
    SessionEnd,
    SessionJoin,
    SessionLeave,
    SessionRejected,
    SessionStart,
    now_rfc3339,
)

from . import login_banner, programs, sockaddr
from .cgroups import CgroupTree, PopulatedWatcher
from .kernel import Kernel
from .recorder import Recorder
from .relays import RelayControl, RelayError, RelayJournal, RelayLauncher
from .session_core import Peer, Plan, Refusal, Refused, plan_session
from .session_store import SessionStore

log = logging.getLogger(__name__)

# Checks run before a session opens (locks, limits): a refusal (or its message), or None.
AdmissionCheck = Callable[[SessionInfo], Awaitable[Refusal | str | None]]
# Run when a session ends, or when it could not be opened after the checks passed.
EndHook = Callable[[SessionInfo], Awaitable[None]]
Reply = Callable[[OpenSessionReply], Awaitable[None]]
NOTICE_WAIT = 1.0  # at most this long for relays to show a notice and end their programs
CONNECTION_GRACE = 0.03  # channels go first, so sshd can pass their last words on
KV_ACTIVITY_INTERVAL = 10.0  # how often last_active reaches the fleet-wide listing
RELAY_CLOSE_WAIT = 5.0  # a session's end waits this long for its relay's last journal lines
JOURNAL_POLL = 0.5  # journal reads without a wake-up from the relay
REFUSED_GRACE = 3.0  # a refused SSH connection with no channel is closed after this
SFTP_FIELDS = frozenset(SFTP.__struct_fields__) - {"sid", "user", "login", "uid", "event"}
EVENT_UID_NAMESPACE = uuid.UUID("6c1f3a52-33b1-4c6c-9d59-5f3b0e9f6a10")


@dataclass
class SessionSettings:
    """This node's configuration for what sessions run (from ringfence/config.py)."""

    record: Callable[[], wire.RecordMode] = lambda: "node"  # the session_recording_config resource
    stdin_limit: int = 65536
    trusted_cas: Callable[[], set[bytes]] = frozenset
    require_registered: bool = False


@dataclass
class _Relayed:
    """A session whose program a relay runs."""

    journal: RelayJournal
    control: RelayControl
    task: asyncio.Task | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    published_activity: float = 0.0


def event_uid(sid: str, line: int, part: int = 0) -> str:
    """The same journal line always makes the same event: one read twice (the
    enforcer died between) is dropped as a duplicate downstream."""
    return str(uuid.uuid5(EVENT_UID_NAMESPACE, f"{sid}/{line}/{part}" if part else f"{sid}/{line}"))


class SessionManager:
    def __init__(
        self,
        *,
        tree: CgroupTree,
        bpf: Kernel,
        store: SessionStore,
        emit: Callable[[AuditEvent], None],
        recorder: Recorder,
        node: dict[str, str],
        flags: int,
        counters: dict,
        key_owners: Callable[[], dict],
        roles_of: Callable[[str], list[str]],
        launcher: RelayLauncher,
        journal_dir: Path,
        settings: SessionSettings,
    ) -> None:
        self.tree = tree
        self.bpf = bpf
        self.store = store
        self.emit = emit
        self.recorder = recorder
        self.node = node  # cluster_name, server_id, server_hostname
        self.flags = flags
        # Run once a session's cgroup exists (the login becomes one Ringfence restricts everywhere).
        self.opened_hooks: list[Callable[[SessionInfo], None]] = []
        # Returns once every kernel record of the session is in the spool (session.end comes after).
        self.drained: Callable[[SessionInfo], Awaitable[None]] = _nothing_to_drain
        self.counters = counters
        self.key_owners = key_owners
        self.roles_of = roles_of
        self.launcher = launcher
        self.journal_dir = journal_dir
        self.settings = settings
        self.idle_of: Callable[[SessionInfo], tuple[float, str]] = lambda _info: (0.0, "")
        self.by_sid: dict[str, SessionInfo] = {}
        self.by_cgroup: dict[int, SessionInfo] = {}
        self.by_path: dict[str, SessionInfo] = {}
        self.relayed: dict[str, _Relayed] = {}
        self.activity: dict[str, float] = {}  # sid -> monotonic time of the client's last input
        self.participants: dict[str, list[str]] = {}  # everyone who took part: owner, then joiners
        self.watching: dict[str, list[str]] = {}  # joiners still watching
        self.checks: list[AdmissionCheck] = []
        self.end_hooks: list[EndHook] = []
        self.end_of_session: list[Callable[[str], None]] = []  # run before session.end (joins end first)
        self.terminating: set[str] = set()
        self.kv: KeyValue | None = None
        self.watcher: PopulatedWatcher | None = None
        self._ending: dict[str, asyncio.Task] = {}
        for key in ("sessions_active", "relay_failures", "idle_terminations"):
            counters.setdefault(key, 0)

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
        return Peer(pid=pid, uid=uid, account=account, session=session, foreign_session=foreign,
                    parent=_parent_of(pid))

    def channels_of(self, conn_sid: str) -> list[SessionInfo]:
        return [s for s in self.by_sid.values() if s.connection == conn_sid]

    def last_input(self, sid: str) -> float:
        """Monotonic time of the client's last input to this session (or its channels)."""
        return max([self.activity.get(sid, 0.0)] + [self.activity.get(c.sid, 0.0) for c in self.channels_of(sid)])

    # --- restart ---------------------------------------------------------------------------
    def restore(self) -> list[str]:
        """Take back the sessions a previous enforcer left; return those that ended meanwhile."""
        ended = []
        for info in self.store.load_all():
            self._track(info)
            self.activity[info.sid] = time.monotonic()
            if info.relay:
                self._follow(info)
            if self.tree.path(info.cgroup).exists():
                assert self.watcher is not None
                self.watcher.watch(info.sid, self.tree.path(info.cgroup))
                if self.tree.populated(info.cgroup) or (info.relay and not self.relayed[info.sid].closed.is_set()):
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
    async def open(self, peer: Peer, req: OpenSessionRequest, fds: list[int], client: socket.socket,
                   reply: Reply) -> SessionInfo | None:
        """Open the session asked for and answer through `reply`; raises Refused.
        For a program, its relay takes `client` and `fds` over once the session is open."""
        try:
            return await self._open(peer, req, fds, client, reply)
        except Refused as exc:
            if req.kind == "connection" and peer.uid == 0 and peer.parent > 1:
                if not exc.recorded:
                    self.emit(SessionRejected(user=req.login, login=req.login, reason=str(exc)))
                self._close_refused(peer.parent)
            raise

    def _close_refused(self, sshd: int) -> None:
        """sshd runs no program for a refused login and shows our reason on its channel; a
        connection without one (ssh -N) would stay up doing nothing: close it after a moment."""
        started = _start_time(sshd)

        def hang_up() -> None:
            if started and _start_time(sshd) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sshd, signal.SIGTERM)
                    log.info("closed refused SSH connection (sshd %d)", sshd)

        asyncio.get_running_loop().call_later(REFUSED_GRACE, hang_up)

    async def _open(self, peer: Peer, req: OpenSessionRequest, fds: list[int], client: socket.socket,
                    reply: Reply) -> SessionInfo | None:
        plan: Plan = plan_session(peer, req, self.key_owners(), self.roles_of, has_program=bool(fds),
                                  trusted_cas=self.settings.trusted_cas(),
                                  require_registered=self.settings.require_registered)
        info = self._describe(plan, req)
        program = self._program(plan, req, fds, info, peer) if fds else None
        for check in self.checks:
            refusal = await check(info)
            if refusal:
                if isinstance(refusal, str):
                    refusal = Refusal(refusal)
                await self._run_end_hooks(info)  # give back what earlier checks took
                self.emit(SessionRejected(user=info.user, login=info.login, reason=refusal.reason,
                                          max=refusal.max, sid=info.connection))
                raise Refused(refusal.reason, recorded=True)
        try:
            info.cgroup_id = self.tree.create(info.cgroup)
            info.relay = program is not None
            self.store.save(info)  # before any process is inside: a restart can always attribute it
            self.bpf.add_session(info.cgroup_id, self.flags)
            for hook in self.opened_hooks:
                hook(info)
            assert self.watcher is not None
            self.watcher.watch(info.sid, self.tree.path(info.cgroup))
            self._track(info)
            self.activity[info.sid] = time.monotonic()
            if plan.pid:
                self.tree.move(info.cgroup, plan.pid)
        except Exception as exc:
            self._forget(info)
            await self._run_end_hooks(info)
            raise Refused(f"cannot place process {plan.pid} in a session cgroup: {exc}") from exc
        await reply(OpenSessionReply(ok=True, sid=info.sid, user=info.user))
        if program is not None:
            await self._start_relay(info, program, fds, client)
        if info.kind != "connection":
            self.emit(self._start_event(info, plan))
        await self._publish_info(info)
        log.info("session %s opened: %s, user %s, login %s, pid %d, roles %s", info.sid, info.kind, info.user,
                 info.login, info.pid, ",".join(info.roles) or "-")
        return info

    def _describe(self, plan: Plan, req: OpenSessionRequest) -> SessionInfo:
        sid = str(uuid.uuid4())
        parent = plan.parent
        info = SessionInfo(
            sid=sid, user=plan.user, login=plan.login, roles=list(plan.roles),
            server_id=self.node["server_id"], server_hostname=self.node["server_hostname"],
            cluster_name=self.node["cluster_name"], started=now_rfc3339(), command=list(req.command),
            kind=plan.kind,  # type: ignore[arg-type]
            connection=parent.sid if parent else "",
            cgroup=f"{parent.cgroup}/{sid}" if parent else sid,
            pid=plan.pid, uid=_uid_of(plan.login),
        )
        if plan.identity is not None:  # a connection: facts from sshd's process and SSH_AUTH_INFO_0
            ident = plan.identity
            info.addr_remote, info.addr_local = sockaddr.connection_addresses(plan.pid)
            info.key_id, info.key_fingerprint, info.key_is_sk = ident.key_id, ident.fingerprint, ident.is_sk
            info.identity_source = ident.source
            info.last_login = login_banner.last_login(info.uid)  # before sshd records this one
        elif parent is not None:  # a channel: the connection's facts, nothing from the request
            for name in ("addr_remote", "addr_local", "key_id", "key_fingerprint", "key_is_sk", "identity_source",
                         "last_login"):
                setattr(info, name, getattr(parent, name))
        return info

    def _program(self, plan: Plan, req: OpenSessionRequest, fds: list[int], info: SessionInfo, peer: Peer) -> dict:
        """What the relay runs, decided before the session exists (a bad request changes nothing)."""
        try:
            account = pwd.getpwnam(plan.login)
        except KeyError:
            raise Refused(f"no such login {plan.login!r} on this host") from None
        info.interactive = os.isatty(fds[0])
        info.recording = self.settings.record()  # fixed for the session's life
        info.term = req.env.get("TERM", "")[:64]
        try:
            if plan.kind == "channel":
                path, argv, sftp = programs.ssh_program(account.pw_shell, req.command)
            elif req.command:
                path, argv, sftp = "", list(req.command), False
            else:
                raise Refused("no command given")
            env = programs.bounded_env(dict(req.env))
        except programs.ProgramError as exc:
            raise Refused(str(exc)) from None
        if account.pw_uid != peer.uid:  # root runs it for another login
            env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name,
                       SHELL=account.pw_shell or "/bin/sh")
        shell_login = plan.kind == "channel" and not req.command and info.interactive
        return {"account": account, "path": path, "argv": argv, "env": env, "sftp": sftp,
                "take_terminal": plan.kind == "channel", "requester": peer.pid,
                "banner": login_banner.banner(account.pw_dir, info.last_login) if shell_login else ""}

    async def _start_relay(self, info: SessionInfo, program: dict, fds: list[int], client: socket.socket) -> None:
        timeout, message = self.idle_of(info)
        spec = programs.relay_spec(
            info, account=program["account"], path=program["path"], argv=program["argv"], env=program["env"],
            interactive=info.interactive, take_terminal=program["take_terminal"], sftp=program["sftp"],
            record=info.recording, stdin_limit=self.settings.stdin_limit, idle_timeout=timeout,
            idle_message=message, cgroup=self.tree.path(info.cgroup), journal_dir=self.journal_dir,
            requester=program["requester"], banner=program["banner"],
        )
        self._follow(info)
        try:
            await self.launcher.spawn(spec, [client.fileno(), *fds])
        except RelayError as exc:
            self.counters["relay_failures"] += 1
            log.error("session %s: %s", info.sid, exc)
            with contextlib.suppress(OSError):
                os.write(fds[2], f"ringfence: cannot start the session: {exc}\n".encode())
                client.sendall(b'{"exit":255}\n')
            self.relayed[info.sid].closed.set()
            self._maybe_end(info.sid)

    def _start_event(self, info: SessionInfo, plan: Plan) -> SessionStart:
        return SessionStart(
            user=info.user, login=info.login, sid=info.sid, addr_remote=info.addr_remote,
            addr_local=info.addr_local, pid=plan.pid, cgroup_id=info.cgroup_id, roles=info.roles,
            initial_command=info.command, interactive=info.interactive, kind=info.kind,
            connection=info.connection, proto="ssh" if info.kind == "channel" else "local",
        )

    # --- relays ----------------------------------------------------------------------------
    def _follow(self, info: SessionInfo) -> None:
        journal = RelayJournal(self.journal_dir, info.sid)
        relayed = _Relayed(journal, RelayControl(journal.control_name))
        self.relayed[info.sid] = relayed
        relayed.task = asyncio.get_running_loop().create_task(self._follow_journal(info, relayed))
        relayed.task.add_done_callback(_log_failure)

    async def _follow_journal(self, info: SessionInfo, relayed: _Relayed) -> None:
        """Turn the relay's journal into events and recording, in order, until its last line."""
        connected = False
        while not relayed.closed.is_set():
            if not connected:
                connected = await relayed.control.connect()
                if connected:
                    timeout, message = self.idle_of(info)
                    await relayed.control.send(wire.IdleTimeout(timeout=timeout, message=message))
            relayed.control.wake.clear()
            lines, offset = relayed.journal.read()
            for line in lines:
                self._on_journal(info, relayed, line)
            relayed.journal.commit(offset)
            if relayed.closed.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relayed.control.wake.wait(), JOURNAL_POLL)
            if connected and relayed.control.writer is None:
                connected = False
        relayed.control.close()
        self._maybe_end(info.sid)

    def _on_journal(self, info: SessionInfo, relayed: _Relayed, line: wire.JournalLine) -> None:
        uid = event_uid(info.sid, line.n)
        recorded = info.recorded and not programs.is_sftp(info.command if info.kind == "channel" else [])
        if isinstance(line, wire.Started):
            info.pid = line.pid
            if recorded:
                self.recorder.header(info, line.width or 80, line.height or 24, line.time, info.term)
        elif isinstance(line, wire.Rec):
            if recorded:
                self.recorder.events(info, line.seq + 1, line.ev)
        elif isinstance(line, wire.Active):
            now = time.monotonic()
            self.activity[info.sid] = now
            if info.connection:
                self.activity[info.connection] = now
            info.last_active = now_rfc3339()
            if now - relayed.published_activity > KV_ACTIVITY_INTERVAL:
                relayed.published_activity = now
                asyncio.get_running_loop().create_task(self._publish_info(info))
        elif isinstance(line, wire.Idle):
            self.counters["idle_terminations"] += 1
            self.emit(ClientDisconnect(uid=uid, user=info.user, login=info.login, sid=info.sid, reason=line.message))
        elif isinstance(line, wire.Sftp):
            for i, op in enumerate(line.ops):
                try:
                    fields = {k: v for k, v in op.items() if k in SFTP_FIELDS}
                    self.emit(SFTP(**fields, uid=event_uid(info.sid, line.n, i), user=info.user,
                                   login=info.login, sid=info.sid, working_directory=_home_of(info.login)))
                except (TypeError, ValueError) as exc:
                    self.counters["relay_failures"] += 1
                    log.error("session %s: an sftp operation the relay reported does not fit: %s", info.sid, exc)
        elif isinstance(line, wire.Exit):
            if info.kind == "channel" and info.command and not info.interactive and not programs.is_sftp(info.command):
                self.emit(Exec(uid=uid, user=info.user, login=info.login, sid=info.sid,
                               command=" ".join(info.command), exitCode=str(line.code)))
            if recorded:
                self.recorder.finish(info, line.recs + 1)
        elif isinstance(line, wire.Failed):
            self.counters["relay_failures"] += 1
            log.error("session %s: %s", info.sid, line.message)
        elif isinstance(line, wire.Closed):
            relayed.closed.set()

    async def refresh(self, info: SessionInfo) -> None:
        """The session's roles changed: publish it, and give its relay the idle timeout they set."""
        await self._publish_info(info)
        timeout, message = self.idle_of(info)
        await self.tell(info.sid, wire.IdleTimeout(timeout=timeout, message=message))

    async def tell(self, sid: str, message: msgspec.Struct) -> bool:
        """Send a session's relay a control message (a notice, a peer's input, a new idle timeout)."""
        relayed = self.relayed.get(sid)
        if relayed is None or relayed.closed.is_set():
            return False
        if relayed.control.writer is None:  # a relay that just started may not listen yet
            for _ in range(20):
                if await relayed.control.connect():
                    break
                await asyncio.sleep(0.025)
        return await relayed.control.send(message)

    # --- joining ---------------------------------------------------------------------------
    def join(self, sid: str, user: str, mode: str = "observer") -> bool:
        info = self.by_sid.get(sid)
        if info is None:
            return False
        self.participants.setdefault(sid, [info.user])
        if user not in self.participants[sid]:
            self.participants[sid].append(user)
        self.watching.setdefault(sid, []).append(user)
        self.emit(SessionJoin(user=user, login=info.login, sid=sid, mode=mode))
        return True

    def leave(self, sid: str, user: str) -> None:
        """A watcher left; at the session's end, everyone still watching leaves (see end())."""
        info = self.by_sid.get(sid)
        watching = self.watching.get(sid, [])
        if info is not None and user in watching:
            watching.remove(user)
            self.emit(SessionLeave(user=user, login=info.login, sid=sid))

    # --- end -------------------------------------------------------------------------------
    def _on_cgroup_change(self, sid: str) -> None:
        self._maybe_end(sid)

    def _maybe_end(self, sid: str) -> None:
        """End the session once it has no process left and its relay wrote its last line."""
        info = self.by_sid.get(sid)
        if info is None or sid in self._ending or self.tree.populated(info.cgroup):
            return
        relayed = self.relayed.get(sid)
        if relayed is not None and not relayed.closed.is_set():
            return  # the relay's program has not started yet, or its last lines are coming
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
        await self.drained(info)  # the ring buffers' last records of it precede session.end
        relayed = self.relayed.pop(sid, None)
        if relayed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relayed.closed.wait(), RELAY_CLOSE_WAIT)
            if relayed.task and not relayed.task.done():
                relayed.task.cancel()
            relayed.journal.remove()
        for hook in self.end_of_session:
            hook(sid)
        for watcher in list(self.watching.get(sid, [])):
            self.leave(sid, watcher)
        self.watching.pop(sid, None)
        if info.kind != "connection":
            self.emit(SessionEnd(user=info.user, login=info.login, sid=sid,
                                 participants=self.participants.pop(sid, [info.user]),
                                 session_start=info.started, session_stop=now_rfc3339(),
                                 interactive=info.interactive))
        self._forget(info)
        await self._run_end_hooks(info)
        if self.kv:
            with contextlib.suppress(Exception):
                await self.kv.delete(names.session_key(info.server_id, sid))
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
        self.activity.pop(info.sid, None)
        self._ending.pop(info.sid, None)
        self.terminating.discard(info.sid)
        self.counters["sessions_active"] = len(self.by_sid)

    async def terminate(self, sid: str, message: str) -> bool:
        """Tell the user why (the session's relays show it), then kill every process
        of the session; a connection's channels go first."""
        info = self.by_sid.get(sid)
        if info is None:
            return False
        if sid in self.terminating:
            return True
        self.terminating.add(sid)
        channels = self.channels_of(sid)
        told = []
        for s in (*channels, info):
            if await self.tell(s.sid, wire.Notice(message=message, end=True)):
                told.append(self.relayed[s.sid].closed.wait())
        if told:
            await asyncio.wait([asyncio.ensure_future(w) for w in told], timeout=NOTICE_WAIT)
        for channel in channels:
            self.tree.kill(channel.cgroup)
        if channels:
            await asyncio.sleep(CONNECTION_GRACE)
        self.tree.kill(info.cgroup)
        log.info("session %s terminated: %s", sid, message)
        return True

    async def close(self) -> None:
        """The enforcer stops: follow no journal and end no session now (the store keeps them;
        the next enforcer takes them back and ends those that ended meanwhile)."""
        tasks = [*self._ending.values(), *(r.task for r in self.relayed.values() if r.task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for relayed in self.relayed.values():
            relayed.control.close()

    async def _publish_info(self, info: SessionInfo) -> None:
        if self.kv is None:
            return
        try:
            await self.kv.put(names.session_key(info.server_id, info.sid), msgspec.json.encode(info))
        except Exception as exc:  # the listing is best effort; the session is already enforced
            log.warning("cannot publish session %s to the sessions bucket: %r", info.sid, exc)

    async def publish_all(self) -> None:
        for info in list(self.by_sid.values()):
            await self._publish_info(info)


def _stat_field(pid: int, index: int) -> int:
    """A numeric field of /proc/<pid>/stat, counted after the command name (0: state); 0 when gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[index])
    except (OSError, ValueError, IndexError):
        return 0


def _parent_of(pid: int) -> int:
    return _stat_field(pid, 1)


def _start_time(pid: int) -> int:
    """The process's start time (clock ticks since boot): tells a process from a later one with its pid."""
    return _stat_field(pid, 19)


def _home_of(login: str) -> str:
    try:
        return pwd.getpwnam(login).pw_dir
    except KeyError:
        return ""


def _uid_of(login: str) -> int:
    try:
        return pwd.getpwnam(login).pw_uid
    except KeyError:
        return -1


async def _nothing_to_drain(_info: SessionInfo) -> None:
    return None


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception():
        log.error("a session task failed", exc_info=task.exception())
