"""Which logins obey the policy outside their sessions (cron, at, systemd user
units, lingering managers, leftovers): ssh_service.restricted_session.restricted_logins.

- "sessions" (default): every login that has had a Ringfence session on this
  node, from its first session on. The set is the kernel's pinned `logins` map,
  so it survives enforcer restarts; root is never in it.
- "none": nobody (processes outside sessions are never judged).
- a list of logins: exactly those (logins this host does not know are skipped
  with a warning).
"""

from __future__ import annotations

import logging
import pwd
from typing import Protocol

log = logging.getLogger(__name__)


class LoginMap(Protocol):
    def restricted_logins(self) -> set[int]: ...
    def restrict_login(self, uid: int) -> None: ...
    def release_login(self, uid: int) -> None: ...


def uid_of(login: str) -> int | None:
    try:
        return pwd.getpwnam(login).pw_uid
    except KeyError:
        return None


class RestrictedLogins:
    def __init__(self, kernel: LoginMap, setting: str | list[str]) -> None:
        self.kernel = kernel
        self.setting = setting

    def configure(self) -> set[int]:
        """Bring the kernel's set in line with the setting; returns the set."""
        current = self.kernel.restricted_logins()
        if self.setting == "sessions":
            return current
        wanted: set[int] = set()
        for login in self.setting if isinstance(self.setting, list) else []:
            uid = uid_of(login)
            if uid is None:
                log.warning("restricted_logins: no login %r on this host; skipped", login)
            elif uid != 0:
                wanted.add(uid)
        for uid in current - wanted:
            self.kernel.release_login(uid)
        for uid in wanted - current:
            self.kernel.restrict_login(uid)
        return wanted

    def session_opened(self, login: str) -> None:
        """A session of `login` opens on this node (call before its first process runs)."""
        if self.setting != "sessions":
            return
        uid = uid_of(login)
        if uid is None or uid == 0:
            return
        self.kernel.restrict_login(uid)
