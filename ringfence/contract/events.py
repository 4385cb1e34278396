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
    # true when a field was cut to its bound (see encode_event); absent otherwise
    truncated: bool | msgspec.UnsetType = msgspec.UNSET

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
    # Ringfence addition: set when the event stands for `count` opens identical to
    # one written before it in the session (same program, path, flags and outcome),
    # folded in the kernel; between first_time and time, pid and return_code the last's.
    count: int | msgspec.UnsetType = msgspec.UNSET
    first_time: str | msgspec.UnsetType = msgspec.UNSET


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
    mode: str = "observer"  # observer, peer or moderator (the original's participant modes)


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


def sftp_code(action: int, error: str) -> str:
    """The original's codes (lib/events/codes.go, SFTPOpenCode "TS001I" .. SFTPLinkCode "TS019E"):
    TS, the action's number in its SFTPAction enum (OPEN 1 .. LINK 19), then I, or E when the
    server refused the operation. Action 0 is Ringfence's: the audit of a stream stopped."""
    if 1 <= action <= 19:
        return f"TS{action:03d}{'E' if error else 'I'}"
    return "RF1001W"


class SFTP(AuditEvent, tag="sftp"):
    """One file operation of an sftp session, from ringfence.hooks.sftp_audit (its dicts
    have these fields but the session's own). One code per action and outcome: sftp_code."""

    CODE = "TS001I"  # an open; each event's own code is set from its action and error
    working_directory: str = ""
    path: str = ""
    target_path: str = ""  # rename and link: the new path; symlink: the link
    flags: int = 0  # open's SSH_FXF_* flags
    attributes: dict[str, int | str] | None = None  # what open, mkdir and setstat asked to set
    action: int = 0
    error: str = ""  # the server's message when it refused
    # Ringfence additions: the server's status (None: its answer was not seen); on a file's close
    # the bytes moved through its handle (lower bounds when not bytes_exact); a path cut to 4096 bytes.
    status: int | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_exact: bool = True

    def __post_init__(self) -> None:
        if not self.code:
            self.code = sftp_code(self.action, self.error)


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


class UserUpdated(AuditEvent, tag="user.update"):
    CODE = "T1003I"
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


class RecordingConfigUpdated(AuditEvent, tag="session_recording_config.update"):
    CODE = "RF2004I"
    mode: str = ""


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


# --- fleet membership ----------------------------------------------------------------------
class JoinTokenCreated(AuditEvent, tag="join_token.create"):
    CODE = "RF4000I"
    token_id: str = ""  # the start of the token's sha256; the token itself is never recorded
    type: str = ""
    expires: str = ""


class JoinTokenDeleted(AuditEvent, tag="join_token.delete"):
    CODE = "RF4001I"
    token_id: str = ""
    reason: str = ""  # "deleted" (tokens rm) or "used" (a node joined with it)


class NodeJoined(AuditEvent, tag="node.join"):
    CODE = "RF4002I"
    node: str = ""
    node_server_id: str = ""  # server_id is the control-plane node that wrote the event
    nkey: str = ""
    token_id: str = ""


class NodeRemoved(AuditEvent, tag="node.delete"):
    CODE = "RF4003I"
    node: str = ""
    node_server_id: str = ""


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


# Every field of an event is bounded, so no user can make an event the audit stream
# refuses (and nobody has to trust each writer to cut what its users control): a
# string longer than MAX_FIELD_CHARS characters, or a list longer than MAX_LIST_ITEMS,
# is cut and the event carries "truncated": true. Should the event still be larger
# than MAX_EVENT_BYTES, fields are cut shorter until it fits.
MAX_FIELD_CHARS = 4096
MAX_LIST_ITEMS = 256
MAX_EVENT_BYTES = 64 * 1024


def _cut(value: Any, chars: int, items: int) -> tuple[Any, bool]:
    if isinstance(value, str):
        return (value[:chars], True) if len(value) > chars else (value, False)
    if isinstance(value, list):
        out, cut = [], len(value) > items
        for v in value[:items]:
            v, c = _cut(v, chars, items)
            out.append(v)
            cut = cut or c
        return out, cut
    if isinstance(value, dict):
        out_d, cut = {}, len(value) > items
        for k, v in list(value.items())[:items]:
            v, c = _cut(v, chars, items)
            out_d[k[:chars]] = v
            cut = cut or c or len(k) > chars
        return out_d, cut
    return value, False


def encode_event(event: AuditEvent) -> bytes:
    data = _encoder.encode(event)
    if len(data) <= MAX_FIELD_CHARS:
        return data  # nothing in it can be over a bound (the common case costs nothing more)
    doc = msgspec.to_builtins(event)
    chars, items = MAX_FIELD_CHARS, MAX_LIST_ITEMS
    while True:
        bounded, cut = _cut(doc, chars, items)
        if not cut:
            return data
        bounded["truncated"] = True
        out = _encoder.encode(bounded)
        if len(out) <= MAX_EVENT_BYTES:
            return out
        chars, items = max(chars // 4, 16), max(items // 2, 8)


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
