"""The enforcer: one per host, root. Wires cgroups, BPF, the session socket,
the policy follower and the event spool to NATS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from pathlib import Path

from ringfence.auth import access_denied, is_allowed, may_join
from ringfence.contract import names
from ringfence.contract.api import ApiError, JoinInput, JoinReply, JoinRequest, KillRequest, SessionInfo
from ringfence.contract.documents import strict_request
from ringfence.contract.events import AuditEvent, ClientDisconnect, encode_event
from ringfence.contract.resources import Role, SessionRecordingConfig
from ringfence.durations import parse_duration
from ringfence.runtime import kv_read
from ringfence.runtime.audit_publish import publish_batches, refused_for_good, stamp
from ringfence.runtime.kv_mirror import KvMirror
from ringfence.runtime.service import Call, ServiceContext, StartupError

from . import kernel, node_status, simulated, ssh_identity
from .attribution import Attribution
from .cgroups import CgroupTree
from .directory import Directory
from .joins import Joins
from .kernel_events import KernelEvents
from .leases import ConnectionLeases
from .limits import SessionLimits
from .lock_guard import LockGuard
from .policy_follower import PolicyFollower
from .recorder import Recorder, publish_chunks
from .recording_bpf import RecordingBPF
from .relays import RelayLauncher
from .restricted_bpf import SESSION_RECORDED, SESSION_RESTRICTED, BpfLoadError, RestrictedBPF
from .restricted_logins import RestrictedLogins
from .session_manager import SessionManager, SessionSettings
from .session_socket import SessionSocket
from .session_store import SessionStore
from .spool import Spool

log = logging.getLogger(__name__)

LOST_REPORT_INTERVAL = 5.0
NODE_SYNC_MAX_LAG = 15.0  # recordings undelivered this long end node-sync sessions
STOP_TIMEOUT = 5.0


def socket_path(data_dir: str) -> Path:
    return Path(data_dir) / "enforcer.sock"


class EnforcerAdapter:
    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None
        self.bpf: kernel.Kernel | None = None
        self.recording_bpf: RecordingBPF | None = None
        self.spool: Spool | None = None
        self.recordings: Spool | None = None
        self.sessions: SessionManager | None = None
        self.socket: SessionSocket | None = None
        self.policy: PolicyFollower | None = None
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self._stuck_since = 0.0  # monotonic: since when recordings have not moved

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        cfg = ctx.config
        tree, bpffs = await self._load_restrictions()
        data = Path(cfg.data_dir) / "enforcer"
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(cfg.data_dir).chmod(0o755)  # session users reach the socket inside it
        self.spool = Spool(data / "spool")
        self.recordings = Spool(data / "recordings-spool")
        self.directory = Directory(ctx.nc, ctx.counters)
        self.recording_config: KvMirror[SessionRecordingConfig] = KvMirror(
            ctx.nc, names.POLICY_BUCKET, names.RECORDING_CONFIG_KEY, SessionRecordingConfig, counters=ctx.counters)
        self.launcher = RelayLauncher(tree.mount / "ringfence" / f"{cfg.nodename}.relays", data / "relays.log")
        await self.launcher.start()
        self.sessions = self._session_manager(tree, data)
        self.attribution = Attribution(self.sessions.lookup_cgroup)
        self.sessions.end_hooks.insert(0, self._session_ended)
        self.logins = RestrictedLogins(self.bpf, cfg.ssh_service.restricted_session.restricted_logins)
        self.logins.configure()
        self.sessions.opened_hooks.append(lambda info: self.logins.session_opened(info.login))
        self.sessions.drained = self.kernel_drained
        self.guard = LockGuard(ctx.nc, self.sessions, self.directory, parse_duration(cfg.lock_view_max_staleness),
                               self.emit, ctx.counters)
        leases = ConnectionLeases(await kv_read.open_bucket(ctx.js, names.LEASES_BUCKET), ctx.server_id,
                                  parse_duration(cfg.ssh_service.connection_lease_ttl), ctx.js)
        self.limits = SessionLimits(ctx.nc, leases, self.sessions, self.directory, self.emit, ctx.counters)
        # Limits take a lease (which may wait for one): a lock that arrived meanwhile still counts.
        self.sessions.checks += [self.guard.check, self._recording_check, self.limits.check, self.guard.check]
        self.sessions.end_hooks.append(self.limits.on_end)
        self.sessions.idle_of = self.limits.idle_of
        self.joins = Joins(ctx.nc, ctx.server_id, self.sessions, ctx.counters)
        self.directory.on_change.append(self._roles_changed)
        self.sessions.end_of_session.append(self.joins.session_ended)

        await self._take_back_sessions(bpffs, leases)
        self.sessions.kv = await ctx.js.key_value(names.SESSIONS_BUCKET)
        await self.sessions.publish_all()
        self.policy = PolicyFollower(self.bpf, ctx.nc, cfg.ssh_service.restricted_session.enabled,
                                     cfg.ssh_service.enhanced_recording.enabled, ctx.counters)
        self._start_tasks(data)
        await self._loaded()
        self.socket = SessionSocket(socket_path(cfg.data_dir), self.sessions, ctx.counters)
        await self.socket.start()
        log.info("session socket at %s", self.socket.path)
        # Who may join or kill a session depends on its user's roles and the mode asked for:
        # decided in the handlers (ringfence.auth.may_join), so no rule is required up front.
        anyone = lambda _call: []  # noqa: E731
        for verb, handler, body in (("kill", self._kill, KillRequest), ("join", self._join, JoinRequest),
                                    ("join_input", self._join_input, JoinInput)):
            await ctx.add_endpoint(verb, names.enforcer_subject(ctx.server_id, verb), handler, request=body,
                                   action=anyone)
        if simulated.enabled():
            await ctx.add_endpoint("simulate", names.enforcer_subject(ctx.server_id, "simulate"), self._simulate,
                                   request=strict_request(dict[str, int]),
                                   action=("session", "update"))

    async def _loaded(self) -> None:
        """Fail closed: the socket admits no session before the policy is in the maps and the
        locks, users, roles and cluster settings are known (until then PAM refuses logins)."""
        assert self.policy is not None
        pending = {
            "network restrictions": self.policy.ready, "locks": self.guard.view.ready,
            "cluster auth preference": self.guard.cap.ready, "users": self.directory.users.ready,
            "roles": self.directory.roles.ready, "cluster networking config": self.limits.networking.ready,
            "session recording config": self.recording_config.ready,
        }
        while waiting := [name for name, ready in pending.items() if not ready.is_set()]:
            if self.stop_event.is_set():
                return
            waits = [asyncio.ensure_future(pending[name].wait()) for name in waiting]
            done, rest = await asyncio.wait(waits, timeout=10)
            for w in rest:
                w.cancel()
            if not done:
                log.warning("not admitting sessions yet: still loading %s", ", ".join(waiting))

    def _recording_mode(self) -> str:
        found = self.recording_config.values.get(names.RECORDING_CONFIG_KEY)
        return found.spec.mode if found else "node"

    def _recordings_stuck(self) -> str:
        """Why recordings cannot be stored now (node-sync refuses and ends sessions), or ""."""
        assert self.recordings is not None
        if self._stuck_since and time.monotonic() - self._stuck_since > NODE_SYNC_MAX_LAG:
            return (f"session recordings have not reached the audit service for {NODE_SYNC_MAX_LAG:g}s; "
                    "the session ends (session_recording mode node-sync)")
        return ""

    async def _recording_check(self, info: SessionInfo) -> str | None:
        """Admission: under node-sync, no session starts that could not be recorded."""
        if info.kind != "connection" and self._recording_mode() == "node-sync":
            return self._recordings_stuck() or None
        return None

    async def _watch_recording_delivery(self, stop: asyncio.Event) -> None:
        """node-sync: a session whose recording cannot be stored ends, with a message."""
        assert self.recordings is not None and self.sessions is not None
        delivered = self.recordings.delivered
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if self.recordings.delivered != delivered or not self.recordings.pending_bytes():
                delivered, self._stuck_since = self.recordings.delivered, 0.0
                continue
            self._stuck_since = self._stuck_since or time.monotonic()
            reason = self._recordings_stuck()
            if not reason:
                continue
            for info in list(self.sessions.by_sid.values()):
                if info.recording == "node-sync" and info.sid not in self.sessions.terminating:
                    self.emit(ClientDisconnect(user=info.user, login=info.login, sid=info.sid, reason=reason))
                    await self.sessions.terminate(info.sid, reason)

    def _roles_changed(self) -> None:
        """Users or roles changed: running sessions take their users' roles now (locks by role,
        limits and idle timeouts follow)."""
        if self.sessions is None:
            return
        changed = False
        for info in list(self.sessions.by_sid.values()):
            roles = self.directory.roles_of(info.user)
            if roles != info.roles:
                info.roles = roles
                self.sessions.store.save(info)
                changed = True
                asyncio.get_running_loop().create_task(self.sessions.refresh(info))
        if changed:
            asyncio.get_running_loop().create_task(self.guard.sweep())

    async def _simulate(self, call: Call[dict[str, int]]) -> dict:
        """Benchmarks: make the simulated kernel write `events` denied-connect records."""
        body = call.body
        if not isinstance(self.bpf, simulated.SimulatedKernel):
            raise ApiError("only a simulated kernel makes records on request", "bad_request")
        self.bpf.generate(max(0, min(body.get("events", 0), 1_000_000)))
        return {"queued": body.get("events", 0)}

    async def _load_restrictions(self) -> tuple[CgroupTree, Path]:
        """The node's cgroup tree with the restricted-session programs attached to it."""
        assert self.ctx is not None
        cfg = self.ctx.config
        rec = cfg.ssh_service.enhanced_recording
        if simulated.enabled():
            log.warning("SIMULATED KERNEL (%s): no BPF, no cgroups, nothing is enforced; benchmarks only",
                        simulated.ENV)
            self.bpf = simulated.SimulatedKernel()
            fake = Path(cfg.data_dir) / "simulated-kernel"
            return CgroupTree(fake / "cgroup2", cfg.nodename), fake / "bpffs"
        try:
            kernel.check_host()
            mount = kernel.find_cgroup2(rec.cgroup_path)
            bpffs = kernel.ensure_bpffs()
            tree = CgroupTree(mount, cfg.nodename)
            self.bpf = restricted = await asyncio.to_thread(
                RestrictedBPF, bpffs / "ringfence" / cfg.nodename, rec.ring_buffer_kib * 1024
            )
            restricted.attach(mount, tree.root)
        except (kernel.HostNotReady, BpfLoadError) as exc:
            raise StartupError(str(exc)) from None
        log.info("restricted-session programs attached to %s (cgroup2 at %s)", tree.root, mount)
        return tree, bpffs

    def _session_manager(self, tree: CgroupTree, data: Path) -> SessionManager:
        assert self.ctx is not None and self.bpf is not None
        cfg, ctx = self.ctx.config, self.ctx
        ssh = cfg.ssh_service
        flags = (SESSION_RESTRICTED if cfg.ssh_service.restricted_session.enabled else 0) | (
            SESSION_RECORDED if cfg.ssh_service.enhanced_recording.enabled else 0
        )
        manager = SessionManager(
            tree=tree,
            bpf=self.bpf,
            store=SessionStore(data / "sessions"),
            emit=self.emit,
            recorder=Recorder(self.recordings, lambda chunk: self.joins.on_chunk(chunk)),
            # The configured node name, as the original reports its nodename (the NODE column of
            # `sessions ls`, the sessions' events); it defaults to the host name.
            node={"cluster_name": cfg.cluster_name, "server_id": ctx.server_id, "server_hostname": cfg.nodename},
            flags=flags,
            counters=ctx.counters,
            key_owners=lambda: self.directory.key_owners,
            roles_of=self.directory.roles_of,
            launcher=self.launcher,
            journal_dir=_private_dir(data / "relays"),
            settings=SessionSettings(
                record=self._recording_mode, stdin_limit=ssh.record_stdin_bytes,
                trusted_cas=lambda: _trusted_cas(ssh.trusted_user_ca_keys),
                require_registered=ssh.require_registered_identity,
            ),
        )
        manager.start(asyncio.get_running_loop())
        return manager

    async def _take_back_sessions(self, bpffs: Path, leases: ConnectionLeases) -> None:
        """Sessions an earlier enforcer left: known before the first kernel record is
        read, so records written while no enforcer ran are still attributed."""
        assert self.ctx is not None and self.sessions is not None and self.bpf is not None
        cfg, counters = self.ctx.config, self.ctx.counters
        ended = self.sessions.restore()
        for info in self.sessions.by_sid.values():
            if info.kind == "connection":
                leases.held[info.sid] = info.user  # renewed from now on, released at its end
        counters.setdefault("lost_network", 0)
        self.kernel_events = KernelEvents(self.spool, lambda ev: stamp(ev, self.ctx), self.attribution, counters,
                                          self._reader_cycles)
        self.bpf.start_reader(self.kernel_events.on_network)
        rec = cfg.ssh_service.enhanced_recording
        if rec.enabled and not simulated.enabled():
            try:
                self.recording_bpf = await asyncio.to_thread(RecordingBPF, bpffs / "ringfence" / cfg.nodename,
                                                             rec.ring_buffer_kib * 1024)
            except (kernel.HostNotReady, BpfLoadError) as exc:
                raise StartupError(f"enhanced recording: {exc}") from None
            self.recording_bpf.start_reader(self.kernel_events.on_commands, self.kernel_events.on_disks)
            log.info("enhanced recording on: command and disk events for session processes")
        for sid in ended:
            await self.sessions.end(sid)

    def _start_tasks(self, data: Path) -> None:
        assert self.ctx is not None and self.spool is not None and self.recordings is not None
        stop = self.stop_event
        self.tasks = [
            asyncio.create_task(self.policy.run(stop), name="policy"),
            asyncio.create_task(self.spool.run(self._publish_events, stop, refused_for_good), name="spool"),
            asyncio.create_task(self.recordings.run(self._publish_recordings, stop, refused_for_good),
                                name="recordings"),
            asyncio.create_task(self._report_lost(), name="lost"),
            *(asyncio.create_task(t, name="directory") for t in self.directory.tasks(stop)),
            *(asyncio.create_task(t, name="locks") for t in self.guard.tasks(stop)),
            *(asyncio.create_task(t, name="limits") for t in self.limits.tasks(stop)),
            asyncio.create_task(self.joins.expire_loop(stop), name="joins"),
            asyncio.create_task(self.recording_config.run(stop), name="recording-config"),
            asyncio.create_task(self._watch_recording_delivery(stop), name="recording-delivery"),
            asyncio.create_task(node_status.report(self.ctx, self.guard.view_age, stop), name="node-status"),
        ]
        for t in self.tasks:
            t.add_done_callback(self._task_ended)
        self.ctx.gauges.update({
            "spool_pending_bytes": self.spool.pending_bytes,
            "spool_age_seconds": self.spool.age,
            "lock_view_staleness_seconds": self.guard.view_age,
            "leases_held": lambda: len(self.limits.leases.held),
            "policy_apply_seconds": lambda: self.policy.apply_seconds if self.policy else 0.0,
        })

    async def _publish_events(self, lines: list[bytes]) -> None:
        assert self.ctx is not None
        await publish_batches(self.ctx.js, self.ctx.server_id, lines)
        self.ctx.counters["events_published"] = self.ctx.counters.get("events_published", 0) + len(lines)

    async def _publish_recordings(self, lines: list[bytes]) -> None:
        assert self.ctx is not None
        await publish_chunks(self.ctx.js, lines)
        self.ctx.counters["recording_bytes"] = self.ctx.counters.get("recording_bytes", 0) + sum(map(len, lines))

    def _running(self, sid: str) -> SessionInfo:
        info = self.sessions.by_sid.get(sid) if self.sessions else None
        if info is None:
            raise ApiError(f'session "{sid}" is not running on {self.ctx.config.nodename}', "not_found")
        return info

    async def _roles_of(self, actor: str) -> list[Role] | None:
        """The verified operator's roles; None when operator_auth is off (everything allowed)."""
        request_auth = self.ctx.auth
        if request_auth is None or not request_auth.required:
            return None
        user = await request_auth.directory.user(actor)
        return await request_auth.directory.roles_of(user) if user is not None else []

    async def _join(self, call: Call[JoinRequest]) -> JoinReply:
        info = self._running(call.body.sid)
        roles = await self._roles_of(call.actor)
        if roles is not None and not may_join(roles, info.roles, call.body.mode):
            raise ApiError(f'access denied to join session "{info.sid}" as {call.body.mode}', "access_denied")
        return self.joins.open(info.sid, call.actor, call.body.mode, call.body.box_key)

    async def _join_input(self, call: Call[JoinInput]) -> dict:
        try:
            sealed = base64.b64decode(call.body.data, validate=True)
        except ValueError:
            raise ApiError("data is not base64", "invalid") from None
        await self.joins.input(call.body.join_id, call.actor, sealed, call.body.leave)
        return {}

    async def _kill(self, call: Call[KillRequest]) -> dict:
        """`ringfence sessions kill SID`: end a session on this node (session delete, or a moderator's join)."""
        info = self._running(call.body.sid)
        roles = await self._roles_of(call.actor)
        if roles is not None and not (is_allowed(roles, "session", "delete") or may_join(roles, info.roles,
                                                                                          "moderator")):
            raise ApiError(access_denied("delete", "session"), "access_denied")
        await self.sessions.terminate(info.sid, call.body.message or "session terminated by an operator")
        return {"sid": info.sid}

    def _task_ended(self, task: asyncio.Task) -> None:
        """A watcher (policy, locks, users, spool...) that ends before the enforcer stops takes it
        down: carrying on without it would enforce what it no longer knows."""
        if self.stop_event.is_set() or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("enforcer task %s failed", task.get_name(), exc_info=exc)
        self.ctx.fail(f"its {task.get_name()} task ended" + (f": {exc!r}" if exc else ""))

    def _record_sources(self) -> list[kernel.RecordSource]:
        return [s for s in (self.bpf, self.recording_bpf) if s is not None]

    def _reader_cycles(self) -> int:
        """Rounds completed by every kernel-record reader (the slowest one counts)."""
        return min((s.reader_cycles for s in self._record_sources()), default=0)

    def emit(self, event: AuditEvent) -> None:
        """Queue an event for the audit trail (durably, before returning)."""
        assert self.ctx is not None and self.spool is not None
        self.spool.append(encode_event(stamp(event, self.ctx)))

    async def kernel_drained(self, info: SessionInfo) -> None:
        """For the session flow, just before it writes session.end of `info`: returns
        once every kernel record of that session is in the spool, summaries included."""
        if self.recording_bpf is not None:
            self.recording_bpf.request_folds()  # its repeated opens counted so far
        await self.kernel_events.drained(info)

    async def _session_ended(self, info: SessionInfo) -> None:
        self.attribution.ended(info)
        self.kernel_events.flush_folds(info.cgroup_id)

    def _lost_counts(self) -> dict[str, int]:
        return {source: n for s in self._record_sources() for source, n in s.lost().items()}

    async def _report_lost(self) -> None:
        """Turn the kernel's drop counters into audit events (and stats counters):
        one audit.events_lost per session (or login outside sessions) and source,
        naming it, each time its count grew. What was reported is kept in the
        pinned maps, so another enforcer on this node (a restart, another data
        dir) reports only what is new."""
        assert self.ctx is not None and self.bpf is not None
        while not self.stop_event.is_set():
            for source, total in self._lost_counts().items():
                self.ctx.counters[f"lost_{source}"] = total
            if self.spool and self.recordings:  # lines the stream refused for good, moved aside
                self.ctx.counters["spool_rejected"] = self.spool.rejected + self.recordings.rejected
            reported = self.kernel_events.report_losses(self.bpf, self.emit)
            self.kernel_events.flush_folds()  # summaries of a flood reach the trail while it lasts
            log.debug("drop counters checked: %d new reports", reported)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), LOST_REPORT_INTERVAL)

    async def stop(self) -> None:
        # Programs stay attached and maps stay pinned: enforcement continues.
        self.stop_event.set()
        if self.socket:
            await self.socket.stop()
        if self.sessions:
            await self.sessions.close()
        # Tasks finish their round and see stop_event; one stuck on a NATS that is
        # gone too (SIGTERM to everything at once) is cancelled, not waited for.
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=STOP_TIMEOUT)
            for t in stuck:
                t.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self.recording_bpf:
            self.recording_bpf.close()
        if self.bpf:
            self.bpf.stop_reader()
        if self.spool:
            self.spool.close()
        if self.recordings:
            self.recordings.close()
        if self.sessions and self.sessions.watcher:
            self.sessions.watcher.close()
        if getattr(self, "launcher", None):
            self.launcher.close()
        if self.bpf:
            self.bpf.close()


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _trusted_cas(path: str) -> set[bytes]:
    """The CA keys of ssh_service.trusted_user_ca_keys, read at each login (so edits count at once)."""
    if not path:
        return set()
    try:
        return ssh_identity.read_trusted_cas(Path(path).read_text())
    except OSError as exc:
        log.error("cannot read ssh_service.trusted_user_ca_keys %s (%s): no certificate is trusted", path,
                  exc.strerror)
        return set()


def make_adapter(_args) -> EnforcerAdapter:
    return EnforcerAdapter()
