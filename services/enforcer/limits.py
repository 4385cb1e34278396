"""Session control (seed 002): max_connections, max_sessions, client_idle_timeout.

- max_connections: SSH connections per user across the whole fleet, as leases
  each node keeps under its own keys (leases.py: how two nodes never both take
  the last slot); a lease is given back the moment its connection ends.
- max_sessions: session channels per SSH connection (all on this node).
- client_idle_timeout: no input from the client for that long ends the idle
  channel (its relay enforces it) or, for a connection with no channel left
  (ssh -N), the connection, with the original's message. Output does not count.
Each limit is the smallest non-zero value among the user's roles (and, for the
idle timeout, the cluster networking config).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from nats.aio.client import Client

from ringfence.contract import names
from ringfence.contract.api import SessionInfo
from ringfence.contract.events import ClientDisconnect
from ringfence.contract.resources import ClusterNetworkingConfig, Role
from ringfence.durations import format_duration, parse_duration
from ringfence.runtime.kv_mirror import KvMirror

from . import forwards
from .leases import ConnectionLeases
from .session_core import Refusal

log = logging.getLogger(__name__)

IDLE_CHECK = 0.5


# --- pure ---------------------------------------------------------------------------------------------
def smallest_limit(values: Iterable[int | float]) -> int | float:
    """The smallest non-zero value; 0 when none is set."""
    return min((v for v in values if v and v > 0), default=0)


def idle_timeout(cluster: str, roles: Iterable[Role]) -> float:
    values = [parse_duration(cluster)] if cluster else []
    values += [parse_duration(r.spec.options.client_idle_timeout) for r in roles if r.spec.options.client_idle_timeout]
    return float(smallest_limit(values))


def too_many_connections(user: str, limit: int) -> Refusal:
    return Refusal(f'too many concurrent ssh connections for user "{user}" (max={limit})', limit)


def too_many_channels(user: str, limit: int) -> Refusal:
    return Refusal(f'too many session channels for user "{user}" (max={limit})', limit)


def idle_message(timeout: float) -> str:
    return f"Client exceeded idle timeout of {format_duration(timeout)}"


# --- the enforcer's side -------------------------------------------------------------------------------
class SessionLimits:
    def __init__(self, nc: Client, leases: ConnectionLeases, sessions, directory, emit, counters: dict) -> None:
        self.leases = leases
        self.sessions = sessions
        self.directory = directory
        self.emit = emit
        self.counters = counters
        self.networking: KvMirror[ClusterNetworkingConfig] = KvMirror(
            nc, names.POLICY_BUCKET, names.NETWORKING_KEY, ClusterNetworkingConfig, self._networking_changed, counters)
        self.cluster_idle_timeout = ""
        counters.setdefault("idle_terminations", 0)

    def _networking_changed(self) -> None:
        cfg = self.networking.values.get(names.NETWORKING_KEY)
        value = cfg.spec.client_idle_timeout if cfg else ""
        if value != self.cluster_idle_timeout:
            self.cluster_idle_timeout = value
            log.info("cluster client_idle_timeout: %s", value or "none")

    def _roles(self, info: SessionInfo) -> list[Role]:
        return [r for r in (self.directory.role(name) for name in info.roles) if r]

    def max_connections(self, info: SessionInfo) -> int:
        return int(smallest_limit(r.spec.options.max_connections for r in self._roles(info)))

    def max_sessions(self, info: SessionInfo) -> int:
        return int(smallest_limit(r.spec.options.max_sessions for r in self._roles(info)))

    def idle_timeout(self, info: SessionInfo) -> float:
        return idle_timeout(self.cluster_idle_timeout, self._roles(info))

    async def check(self, info: SessionInfo) -> Refusal | None:
        """Admission: a connection takes a fleet-wide lease, a channel needs a free slot."""
        if info.kind == "channel":
            limit = self.max_sessions(info)
            open_channels = len(self.sessions.channels_of(info.connection))
            if limit and open_channels >= limit:
                return too_many_channels(info.user, limit)
        elif info.kind == "connection":
            limit = self.max_connections(info)
            if limit:
                try:
                    taken = await self.leases.acquire(info.user, info.sid, limit)
                except Exception as exc:
                    return Refusal(f"cannot check the connection limit of {info.user} ({exc}); try again")
                if not taken:
                    return too_many_connections(info.user, limit)
        return None

    async def on_end(self, info: SessionInfo) -> None:
        if info.sid in self.leases.held:
            try:
                await self.leases.release(info.sid)
            except Exception as exc:  # it expires after the lease TTL anyway
                log.warning("cannot release the connection lease of %s now (%r)", info.sid, exc)

    async def renew_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.leases.ttl / 3)
            if self.leases.held:
                try:
                    await self.leases.renew()
                except Exception as exc:
                    log.warning("renewing connection leases failed (%r); retrying", exc)

    def idle_of(self, info: SessionInfo) -> tuple[float, str]:
        """The session's idle timeout and the message that ends it (the relay enforces it per channel)."""
        timeout = self.idle_timeout(info)
        return timeout, idle_message(timeout) if timeout else ""

    async def idle_loop(self, stop: asyncio.Event) -> None:
        """Connections (ssh -N tunnels, and whatever runs outside a channel) idle out too:
        their clock is the client's last input on any channel or forward."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), IDLE_CHECK)
            now = time.monotonic()
            overdue: dict[int, tuple[SessionInfo, float]] = {}
            for info in list(self.sessions.by_sid.values()):
                if info.kind != "connection" or info.sid in self.sessions.terminating:
                    continue
                timeout = self.idle_timeout(info)
                if timeout and now - self.sessions.last_input(info.sid) > timeout:
                    overdue[info.cgroup_id] = (info, timeout)
            if not overdue:
                continue
            try:
                ages = await asyncio.to_thread(forwards.input_ages, set(overdue),
                                               {i.addr_local for i, _ in overdue.values()})
            except OSError as exc:
                log.warning("cannot read the forwards' activity (%r); idle connections wait", exc)
                continue
            for cgroup_id, (info, timeout) in overdue.items():
                if cgroup_id in ages and ages[cgroup_id] < timeout:
                    self.sessions.activity[info.sid] = now - ages[cgroup_id]
                    continue
                message = idle_message(timeout)
                self.counters["idle_terminations"] += 1
                self.emit(ClientDisconnect(user=info.user, login=info.login, sid=info.sid, reason=message))
                await self.sessions.terminate(info.sid, message)

    def tasks(self, stop: asyncio.Event) -> list:
        return [self.networking.run(stop), self.renew_loop(stop), self.idle_loop(stop)]
