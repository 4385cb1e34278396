"""Request and reply bodies of the control APIs (CLI <-> services) and of the
enforcer's local session socket."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct, field

from .resources import LockTarget

# --- every reply -------------------------------------------------------------------
ErrorKind = Literal["invalid", "not_found", "access_denied", "conflict", "unavailable", "internal"]


class ApiReply(Struct, omit_defaults=True):
    ok: bool = True
    error: str = ""
    kind: str = ""  # one of ErrorKind when not ok
    result: msgspec.Raw = msgspec.Raw(b"null")


class ApiError(Exception):
    """Raised by a service core; becomes ApiReply(ok=False, ...)."""

    def __init__(self, message: str, kind: ErrorKind = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def ok_reply(result: object = None) -> bytes:
    return msgspec.json.encode(ApiReply(result=msgspec.Raw(msgspec.json.encode(result))))


def error_reply(message: str, kind: str) -> bytes:
    return msgspec.json.encode(ApiReply(ok=False, error=message, kind=kind))


# --- resources (policy and locks services) ---------------------------------------------
class CreateRequest(Struct):
    # Each document as decoded from YAML/JSON; the service decodes it strictly.
    resources: list[msgspec.Raw]
    dry_run: bool = False


class CreateResult(Struct):
    messages: list[str] = field(default_factory=list)


class GetRequest(Struct):
    kind: str
    name: str = ""


class DeleteRequest(Struct):
    kind: str
    name: str = ""


class DeleteResult(Struct):
    message: str


class UserUpdateRequest(Struct, omit_defaults=True):
    """`users add` (create=True: create the user when missing) and `users update`: change only what is
    asked, keep everything else (roles, keys, operator identity)."""

    name: str
    create: bool = False
    set_roles: list[str] | None = None  # None: keep the roles
    add_keys: list[str] = field(default_factory=list)  # OpenSSH public key lines
    remove_keys: list[str] = field(default_factory=list)  # key lines, or their SHA256:... fingerprints
    operator_nkey: str = ""  # a new operator identity's public key; empty: keep the current one


class LockRequest(Struct, omit_defaults=True):
    target: LockTarget
    message: str = ""
    ttl: str = ""  # Go-style duration
    expires: str = ""  # RFC 3339


class LockResult(Struct):
    name: str
    message: str


class UnlockRequest(Struct):
    target: LockTarget


class UnlockResult(Struct):
    names: list[str]
    message: str


# --- audit search ------------------------------------------------------------------------
MAX_SEARCH_LIMIT = 10_000
DEFAULT_SEARCH_LIMIT = 500


class SearchRequest(Struct, omit_defaults=True):
    start: str = ""  # RFC 3339, inclusive
    end: str = ""  # RFC 3339, exclusive
    event_types: list[str] = field(default_factory=list)
    user: str = ""
    sid: str = ""
    limit: int = DEFAULT_SEARCH_LIMIT
    order: Literal["asc", "desc"] = "asc"
    start_key: str = ""


class SearchResult(Struct):
    events: list[msgspec.Raw]
    next_key: str = ""


# --- web console sign-in (`ringfence web login` <-> services/web) ----------------------------
class ConsoleOfferRequest(Struct):
    pass


class ConsoleOffer(Struct):
    """A console session waiting for its operator's grant (ringfence.auth.sign_grant)."""

    offer: str  # its id
    session_nkey: str  # the public key the console signs this session's requests with
    ttl: float  # seconds the grant should last (the console session's lifetime)
    login_subject: str  # where the grant goes: the instance that made the offer


class ConsoleLoginRequest(Struct):
    offer: str
    grant: str  # Ringfence-Delegation value, signed by the operator


class ConsoleLoginResult(Struct):
    url: str  # one-time sign-in URL
    expires_in: float  # seconds it stays usable (once)


# --- sessions -----------------------------------------------------------------------------
SessionKind = Literal["local", "connection", "channel"]


class SessionInfo(Struct, omit_defaults=True):
    """A session on a node, as published fleet-wide in the sessions bucket.

    kind: "local" (`ringfence run`), "channel" (a shell, command or sftp of an
    SSH connection: the session users and auditors see) or "connection" (an SSH
    connection, opened by the PAM hook: it holds sshd itself, so port forwards
    are restricted too, and carries the connection's facts, which its channels
    inherit; it writes no session.start/end of its own).
    """

    sid: str
    user: str
    login: str
    server_id: str
    server_hostname: str
    started: str
    roles: list[str] = field(default_factory=list)
    cluster_name: str = ""
    addr_remote: str = ""
    addr_local: str = ""
    command: list[str] = field(default_factory=list)
    interactive: bool = False
    last_active: str = ""
    cgroup_id: int = 0
    kind: SessionKind = "local"
    connection: str = ""  # for channels: the connection's sid
    cgroup: str = ""  # path below the node's cgroup tree, e.g. "<conn>/<sid>"
    key_id: str = ""  # certificate key ID the user authenticated with (a trusted CA's certificate)
    key_fingerprint: str = ""  # SHA256:... of the key or certificate used to log in
    key_is_sk: bool = False  # a FIDO (sk-) key
    identity_source: str = ""  # how `user` was found: certificate, registered_key or login
    term: str = ""
    pid: int = 0  # connection: sshd's process; otherwise the program's
    uid: int = -1  # the login's uid on this node
    relay: bool = False  # a relay runs the program (journal under the enforcer's relays dir)
    last_login: str = ""  # connection: sshd's "Last login" line of the previous login (shown by the relay)
    recording: Literal["node", "node-sync", "off", ""] = ""  # the session_recording mode it started with

    @property
    def recorded(self) -> bool:
        return self.recording in ("node", "node-sync")


JoinMode = Literal["observer", "peer", "moderator"]


class JoinRequest(Struct, forbid_unknown_fields=True):
    """Join a live session (`ringfence sessions join`). Who joins is the request's verified
    operator, never a name in here. `box_key`: the joiner's Curve25519 public key
    (base64): the session's output and a peer's input travel sealed to it (ringfence/joinbox.py),
    so holding a NATS credential is not enough to read a terminal."""

    sid: str
    box_key: str
    mode: JoinMode = "observer"


class JoinReply(Struct):
    join_id: str
    subject: str  # where the sealed output frames arrive
    box_key: str  # the enforcer's key for this join


class JoinInput(Struct, forbid_unknown_fields=True):
    """A peer's keystrokes, sealed; any request on a join also keeps it alive (JOIN_IDLE)."""

    join_id: str
    data: str = ""  # base64 of a sealed message
    leave: bool = False


class JoinFrame(Struct, omit_defaults=True):
    """What a joiner receives (sealed): terminal events [t, code, data], and at the end `end`."""

    events: list[tuple[float, str, str]] = field(default_factory=list)
    end: bool = False
    reason: str = ""


class KillRequest(Struct, omit_defaults=True):
    sid: str
    message: str = ""


class OpenSessionRequest(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A request on the enforcer's Unix socket (ringfence/hooks/wire.py speaks it).

    connection  root only (sshd's PAM hook, session phase): `login` and
                `auth_info` (sshd's SSH_AUTH_INFO_0); the enforcer takes sshd's
                process from the peer's parent.
    channel     from inside an SSH connection (the ForceCommand wrapper, as the
                user): `command` is what the client asked to run ([] for a shell);
                stdin, stdout and stderr come as SCM_RIGHTS. Identity and
                addresses come from the connection, never from here.
    local       `ringfence run`: root may name any `user` and `login`, others
                only themselves; `command` with SCM_RIGHTS runs it in a relay,
                or (root only) `pid` places that process instead.
    `env` is the environment the program gets (it runs as the requester's login).
    """

    kind: SessionKind = "local"
    login: str = ""
    user: str = ""
    auth_info: str = ""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    pid: int = 0


class OpenSessionReply(Struct, omit_defaults=True):
    ok: bool
    sid: str = ""
    error: str = ""
    user: str = ""
