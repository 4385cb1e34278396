"""Audit events: one Struct per event type, each with exactly one code.

The JSON written to events.log is `msgspec.json.encode(event)`: the `event`
tag comes first, then the common fields, then the type's own fields. Names and
codes match the system the seeds describe so SIEM parsers carry over; codes
starting with RF are Ringfence additions.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar, Union

import msgspec
from msgspec import Struct, field


def now_rfc3339() -> str:
    """UTC time with millisecond precision: 2021-07-22T22:24:14.984Z."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_uid() -> str:
    return str(uuid.uuid4())


class AuditEvent(Struct, tag_field="event"):
    """Fields common to every event. `ei` is assigned by the audit writer."""

    CODE: ClassVar[str] = ""

    ei: int = 0
    uid: str = field(default_factory=new_uid)
    code: str = ""
    time: str = field(default_factory=now_rfc3339)
    cluster_name: str = ""
    user: str = ""
    login: str = ""
    sid: str = ""
    namespace: str = "default"
    server_id: str = ""
    server_hostname: str = ""

    def __post_init__(self) -> None:
        if not self.code:
            self.code = self.CODE

    @classmethod
    def event_type(cls) -> str:
        return cls.__struct_config__.tag  # type: ignore[return-value]


# --- enhanced recording and restricted sessions ---------------------------------------
class SessionCommand(AuditEvent, tag="session.command"):
    CODE = "T4000I"
    pid: int = 0
    ppid: int = 0
    cgroup_id: int = 0
    program: str = ""
    path: str = ""
    argv: list[str] = field(default_factory=list)
    return_code: int = 0


class SessionDisk(AuditEvent, tag="session.disk"):
    CODE = "T4001I"
    pid: int = 0
    cgroup_id: int = 0
    program: str = ""
    path: str = ""
    flags: int = 0
    return_code: int = 0


OPERATION_CONNECT = 0
OPERATION_SEND = 1
# Ringfence addition: a packet of a raw, ICMP (ping) or other socket that the
# connect/sendmsg hooks do not see, judged by its destination as it leaves.
OPERATION_PACKET = 2
ACTION_OBSERVED = 0
ACTION_DENIED = 1
# SessionNetwork.reason (Ringfence addition): "" for a process in a session;
# REASON_OUTSIDE_SESSION for a process of a restricted login running outside
# any session (cron, at, a user manager, a leftover): login set, sid empty.
REASON_OUTSIDE_SESSION = "outside_session"


class SessionNetwork(AuditEvent, tag="session.network"):
    CODE = "T4002I"
    pid: int = 0
    cgroup_id: int = 0
    program: str = ""
    src_addr: str = ""
    dst_addr: str = ""
    dst_port: int = 0
    version: int = 4
    operation: int = OPERATION_CONNECT
    action: int = ACTION_DENIED
    reason: str = ""


# --- session lifecycle ---------------------------------------------------------------
class SessionStart(AuditEvent, tag="session.start"):
    CODE = "T2000I"
    addr_remote: str = field(default="", name="addr.remote")
    addr_local: str = field(default="", name="addr.local")
    pid: int = 0
    cgroup_id: int = 0
    roles: list[str] = field(default_factory=list)
    initial_command: list[str] = field(default_factory=list)
    interactive: bool = False
    proto: str = "ssh"  # "ssh", or "local" for `ringfence run`
    kind: str = "local"  # local, connection or channel (SessionInfo.kind)
    connection: str = ""  # a channel's connection sid


class SessionJoin(AuditEvent, tag="session.join"):
    CODE = "T2001I"


class SessionLeave(AuditEvent, tag="session.leave"):
    CODE = "T2003I"


class SessionEnd(AuditEvent, tag="session.end"):
    CODE = "T2004I"
    participants: list[str] = field(default_factory=list)
    session_start: str = ""
    session_stop: str = ""
    interactive: bool = False


class SessionRejected(AuditEvent, tag="session.rejected"):
    CODE = "T1006W"
    reason: str = ""
    max: int = 0


class Exec(AuditEvent, tag="exec"):
    CODE = "T3002I"
    command: str = ""
    exitCode: str = ""


class ClientDisconnect(AuditEvent, tag="client.disconnect"):
    CODE = "T3006I"
    reason: str = ""


# --- locks, roles, users, cluster settings ----------------------------------------------
class LockCreated(AuditEvent, tag="lock.created"):
    CODE = "TLK00I"
    name: str = ""
    target: dict[str, str] = field(default_factory=dict)
    message: str = ""
    expires: str = ""


class LockDeleted(AuditEvent, tag="lock.deleted"):
    CODE = "TLK01I"
    name: str = ""
    # Ringfence addition: "deleted" (rm), "unlocked" (unlock by target) or "expired".
    reason: str = ""


class RoleCreated(AuditEvent, tag="role.created"):
    CODE = "T9000I"
    name: str = ""


class RoleDeleted(AuditEvent, tag="role.deleted"):
    CODE = "T9001I"
    name: str = ""


class UserCreated(AuditEvent, tag="user.create"):
    CODE = "T1002I"
    name: str = ""
    roles: list[str] = field(default_factory=list)


class UserDeleted(AuditEvent, tag="user.delete"):
    CODE = "T1004I"
    name: str = ""


class CapUpdated(AuditEvent, tag="cluster_auth_preference.update"):
    CODE = "TCAUTH001I"
    locking_mode: str = ""


class NetworkingConfigUpdated(AuditEvent, tag="cluster_networking_config.update"):
    CODE = "RF2003I"
    client_idle_timeout: str = ""


class NetworkRestrictionsUpdated(AuditEvent, tag="network_restrictions.update"):
    CODE = "RF2001I"
    allow: int = 0  # number of CIDRs in each list
    deny: int = 0


class NetworkRestrictionsReset(AuditEvent, tag="network_restrictions.reset"):
    CODE = "RF2002I"


# --- Ringfence's own health -------------------------------------------------------------
class EventsLost(AuditEvent, tag="audit.events_lost"):
    """Kernel records dropped because the ring buffer was full (counted in BPF).
    user, login and sid name the session whose records were dropped (empty when
    the drops cannot be attributed: the counter of a session that ended unseen)."""

    CODE = "RF1000W"
    source: str = ""  # which buffer: "network", "exec", "disk"
    lost: int = 0  # since the previous report
    total: int = 0  # of this session (or, without a session, since the node's maps were created)


MAX_FOLDED_TARGETS = 64


class EventsFolded(AuditEvent, tag="audit.events_folded"):
    """Kernel events of one session counted instead of written one by one: the
    enforcer folds them when they arrive faster than it can write them (a flood),
    so who and how many are kept. user, login and sid name the session."""

    CODE = "RF1001W"
    source: str = ""  # "network", "exec", "disk"
    count: int = 0  # events folded into this summary
    first_time: str = ""  # of the first and last folded event
    last_time: str = ""
    # Distinct destinations ("127.0.0.5:80"; network) or paths (exec, disk), in
    # order of first appearance, at most MAX_FOLDED_TARGETS; truncated when there were more.
    targets: list[str] = field(default_factory=list)
    targets_truncated: bool = False


class LockViewStale(AuditEvent, tag="lock.view_stale"):
    """An enforcer's lock view became unreliable (strict mode acts on this)."""

    CODE = "RF3000W"
    reason: str = ""


EVENT_TYPES: dict[str, type[AuditEvent]] = {}


def _collect(cls: type[AuditEvent]) -> None:
    for sub in cls.__subclasses__():
        EVENT_TYPES[sub.event_type()] = sub
        _collect(sub)


_collect(AuditEvent)

# Every decodable event type, for `msgspec.json.decode(data, type=AnyEvent)`.
AnyEvent = Union[tuple(EVENT_TYPES.values())]  # noqa: UP007 - built from the registry


_decoder = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


def encode_event(event: AuditEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> AuditEvent:
    """The event in `data`; msgspec.DecodeError (ValidationError for a bad field) otherwise."""
    try:
        return _decoder.decode(data)
    except UnicodeDecodeError as exc:  # msgspec's report of bad UTF-8 inside a string
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc}") from None
    except RecursionError:  # skipping a deeply nested unknown field
        raise msgspec.DecodeError("nested too deeply") from None


def event_to_dict(event: AuditEvent) -> dict[str, Any]:
    return msgspec.to_builtins(event)
