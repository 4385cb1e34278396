"""Who may open which session, and as whom: decisions only, no I/O.

Three kinds of session (SessionInfo.kind):
  local       `ringfence run`: root may name any user and login; any other
              account only itself.
  connection  an SSH connection, opened by sshd's PAM hook (root only) for the
              sshd process handling it (the hook's parent); the user comes from
              how the client authenticated (trusted certificate key ID,
              registered key, else the login).
  channel     a shell/command/sftp inside a connection, asked for from inside
              the connection's cgroup (the ForceCommand wrapper). It inherits
              the connection's identity and facts; the request says only what
              to run, which runs as the login anyway. So nothing a user's
              process asks can claim to be someone else or somewhere else.
A process already in a local session or a channel cannot open another session.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ringfence.contract.api import OpenSessionRequest, SessionInfo

from . import ssh_identity


class Refused(Exception):
    """The session is not opened; the message is shown to the user. `recorded`: a
    session.rejected event was already written for it."""

    def __init__(self, message: str, recorded: bool = False) -> None:
        super().__init__(message)
        self.recorded = recorded


@dataclass(frozen=True)
class Refusal:
    """Why an admission check turned a session away (session.rejected: reason, max)."""

    reason: str
    max: int = 0


@dataclass(frozen=True)
class Peer:
    """The process on the other end of the enforcer socket (from SO_PEERCRED)."""

    pid: int
    uid: int
    account: str  # the uid's login name
    # The session of this node the peer is in, or None.
    session: SessionInfo | None = None
    # A session cgroup of another Ringfence node on this host, or None.
    foreign_session: str | None = None
    parent: int = 0  # the peer's parent process (sshd, for the PAM hook)


@dataclass(frozen=True)
class Plan:
    kind: str
    user: str
    login: str
    pid: int  # the process to place in the new cgroup (0: a relay starts the program there)
    roles: tuple[str, ...] = ()
    identity: ssh_identity.SshIdentity | None = None
    parent: SessionInfo | None = None  # the connection of a channel


def _refuse_nesting(peer: Peer) -> None:
    where = peer.session.sid if peer.session else peer.foreign_session
    if where:
        raise Refused(f"process {peer.pid} is already in a session ({where}); a session cannot open another one")


def plan_session(
    peer: Peer,
    req: OpenSessionRequest,
    key_owners: Mapping[tuple[str, str], str],
    roles_of: Callable[[str], list[str]],
    *,
    has_program: bool,
    trusted_cas: set[bytes] = frozenset(),
    require_registered: bool = False,
) -> Plan:
    if req.kind == "channel":
        conn = peer.session
        if conn is None or conn.kind != "connection":
            if conn is not None or peer.foreign_session:
                _refuse_nesting(peer)
            raise Refused(f"process {peer.pid} is not inside an SSH connection; channels open only from sshd")
        if peer.uid != 0 and peer.account != conn.login:
            raise Refused(f"{peer.account} cannot open a channel in {conn.login}'s connection")
        if not has_program:
            raise Refused("a channel needs its stdin, stdout and stderr (SCM_RIGHTS)")
        return Plan("channel", conn.user, conn.login, 0, tuple(conn.roles), None, conn)

    if req.kind == "connection":
        if peer.uid != 0:
            raise Refused("only root (sshd's PAM hook) may open a connection session")
        if peer.parent <= 1 or not req.login:
            raise Refused("a connection session needs sshd as the requester's parent and the login")
        try:
            ident = ssh_identity.resolve(req.auth_info, req.login, key_owners, trusted_cas, require_registered)
        except ssh_identity.UnknownIdentity as exc:
            raise Refused(str(exc)) from None
        return Plan("connection", ident.user, req.login, peer.parent, tuple(roles_of(ident.user)), ident)

    _refuse_nesting(peer)
    if has_program == bool(req.pid):
        raise Refused("a local session runs a program (stdin, stdout and stderr as SCM_RIGHTS) or, for root, "
                      "places a process (pid); give exactly one")
    if req.pid and peer.uid != 0:
        raise Refused("only root may open a session for another process")
    login = req.login or peer.account
    user = req.user or login
    if peer.uid != 0 and (login != peer.account or user != peer.account):
        raise Refused(
            f"only root may open a session for another user: you are {peer.account} (uid {peer.uid}), "
            f"asked for user {user!r} login {login!r}"
        )
    return Plan("local", user, login, req.pid, tuple(roles_of(user)))
