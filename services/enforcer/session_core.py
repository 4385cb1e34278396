"""Who may open which session: decisions only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from ringfence.contract.api import OpenSessionRequest


class Refused(Exception):
    """The session is not opened; the message is shown to the user."""


@dataclass(frozen=True)
class Peer:
    """The process on the other end of the enforcer socket (from SO_PEERCRED)."""

    pid: int
    uid: int
    account: str  # the uid's login name
    session_path: str | None = None  # its cgroup when already inside a session


@dataclass(frozen=True)
class Identity:
    user: str
    login: str


def resolve_identity(peer: Peer, req: OpenSessionRequest) -> Identity:
    """Root (sshd's PAM hook, an operator) may open a session for anyone; any
    other account only for itself, so identities cannot be forged from inside."""
    if peer.session_path:
        raise Refused(
            f"process {peer.pid} is already in a session ({peer.session_path}); "
            "a session cannot open another one"
        )
    if peer.uid == 0:
        login = req.login or peer.account
        return Identity(user=req.user or login, login=login)
    login = req.login or peer.account
    user = req.user or login
    if login != peer.account or user != peer.account:
        raise Refused(
            f"only root may open a session for another user: you are {peer.account} (uid {peer.uid}), "
            f"asked for user {user!r} login {login!r}"
        )
    return Identity(user=user, login=login)
