"""Evaluating locks (seed 004): which locks are in force and whom they stop.

Pure: no NATS, no I/O, no clock. Callers pass `now` (an aware datetime), so
the enforcer decides at the exact instant it acts and tests need no sleeping.
The locks service uses the same functions to validate, list and expire locks,
so both sides agree on what "in force" means.

A lock is in force while `spec.expires` is unset or in the future. It matches
an interaction when ANY target field it sets equals the interaction's value
for that field (for `role`: any of the interaction's roles).

On OpenSSH, `device` is the SHA256 fingerprint of the key (or of the key inside
the certificate) a session logged in with, as `ssh-keygen -lf` prints it
(`SHA256:...`): a lock on it stops a stolen key fleet-wide. `mfa_device` is
the same fingerprint when that key is a FIDO security key (`sk-` types).
`access_request` and `windows_desktop` never occur here: the locks service
refuses locks on them (UNMATCHABLE_TARGETS says why).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .contract.api import SessionInfo
from .contract.resources import LOCK_TARGET_FIELDS, Lock, User
from .contract.strict import show

# RFC 3339 date-time: a date, "T" (or a space), a time, an explicit offset.
_RFC3339 = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<zone>[Zz]|[+-]\d{2}:\d{2})"
)


def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 timestamp ("2021-08-14T22:27:00Z") as an aware datetime in UTC.

    Raises ValueError naming the text. Fractions beyond microseconds are cut."""
    m = _RFC3339.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{show(text)} is not an RFC 3339 time; use e.g. 2021-08-14T22:27:00Z")
    zone = "+00:00" if m["zone"] in ("Z", "z") else m["zone"]
    frac = f".{(m['frac'] + '000000')[:6]}" if m["frac"] else ""
    try:
        parsed = dt.datetime.fromisoformat(f"{m['date']}T{m['time']}{frac}{zone}")
    except ValueError:
        raise ValueError(f"{show(text)} is not a valid time (no such date or time of day)") from None
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is in the year 10000
        raise ValueError(f"{show(text)} is out of range (years 0001 to 9999 in UTC)") from None


def format_time(when: dt.datetime) -> str:
    """RFC 3339 in UTC, like Go's RFC3339Nano: 2021-08-14T22:27:00Z, 2021-08-14T22:27:00.5Z."""
    utc = when.astimezone(dt.UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def expires_at(lock: Lock) -> dt.datetime | None:
    """When the lock stops being in force; None while it lasts until removed.

    An expiry that does not parse (the service never stores one) counts as
    none: the lock stays in force, failing closed."""
    if not lock.spec.expires:
        return None
    try:
        return parse_time(lock.spec.expires)
    except ValueError:
        return None


def in_force(lock: Lock, now: dt.datetime) -> bool:
    """True while `expires` is unset or later than `now` (at the instant itself it has expired)."""
    until = expires_at(lock)
    return until is None or until > now


@dataclass
class Interaction:
    """Who is doing what, in the terms lock targets use. Empty means "not involved"."""

    user: str = ""
    login: str = ""
    roles: list[str] = field(default_factory=list)
    server_id: str = ""
    mfa_device: str = ""
    device: str = ""
    access_request: str = ""
    windows_desktop: str = ""

    @classmethod
    def of_session(cls, session: SessionInfo) -> Interaction:
        """A session as the enforcer sees it: its user, login, roles, node and the key it logged in with."""
        fingerprint = session.key_fingerprint
        return cls(user=session.user, login=session.login, roles=list(session.roles), server_id=session.server_id,
                   device=fingerprint, mfa_device=fingerprint if session.key_is_sk else "")

    @classmethod
    def of_operator(cls, user: User) -> Interaction:
        """A control request: the operator's user and roles (no login, node or key is involved)."""
        return cls(user=user.metadata.name, roles=list(user.spec.roles))


# Lock targets no interaction on an OpenSSH fleet ever has, and why (the locks service refuses them).
UNMATCHABLE_TARGETS = {
    "access_request": "Ringfence has no access requests (OpenSSH sessions never run with an elevated "
                      "request's privileges); lock the user or the role instead",
    "windows_desktop": "Ringfence controls OpenSSH sessions only; there are no Windows desktops to lock",
}


# The interaction field each target field is compared with.
INTERACTION_FIELDS = {name: "roles" if name == "role" else name for name in LOCK_TARGET_FIELDS}


def matches(lock: Lock, interaction: Interaction) -> bool:
    """True when any target field the lock sets equals the interaction's value for it."""
    for name, value in lock.spec.target.fields().items():
        if name == "role":
            if value in interaction.roles:
                return True
        elif value == getattr(interaction, name):
            return True
    return False


def matching_locks(locks: Iterable[Lock], interaction: Interaction, now: dt.datetime) -> list[Lock]:
    """The locks in force at `now` that match `interaction`, in the order given."""
    return [lock for lock in locks if in_force(lock, now) and matches(lock, interaction)]


def lock_message(lock: Lock) -> str:
    """What the user hitting `lock` is told, as the original words it:
    `lock targeting User:"foo@example.com" is in force: Suspicious activity.`"""
    text = f"lock targeting {lock.spec.target.describe()} is in force"
    return f"{text}: {lock.spec.message}" if lock.spec.message else text


def next_expiry(locks: Iterable[Lock], now: dt.datetime) -> dt.datetime | None:
    """The earliest expiry after `now` among `locks` (when the enforcer must look again), or None."""
    future = [t for lock in locks if (t := expires_at(lock)) is not None and t > now]
    return min(future, default=None)


# --- locking modes ------------------------------------------------------------------------------------
PREVENTIVE_LOCKOUT = "preventive lock-out due to local lock view becoming unreliable"


def locking_mode(cluster_mode: str, role_modes: Iterable[str | None]) -> str:
    """"strict" when the cluster default or any role involved says so (one suffices), else "best_effort"."""
    if cluster_mode == "strict" or any(m == "strict" for m in role_modes):
        return "strict"
    return "best_effort"
