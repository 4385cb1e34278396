"""Which logins obey the policy outside their sessions (restricted_logins.py), against a
set standing in for the pinned `logins` map (its real behaviour: tests/adversarial)."""

from __future__ import annotations

import pwd

import pytest

from services.enforcer.restricted_logins import RestrictedLogins

NOBODY = pwd.getpwnam("nobody").pw_uid
DAEMON = pwd.getpwnam("daemon").pw_uid


class Logins:
    def __init__(self, uids: set[int]) -> None:
        self.uids = set(uids)

    def restricted_logins(self) -> set[int]:
        return set(self.uids)

    def restrict_login(self, uid: int) -> None:
        self.uids.add(uid)

    def release_login(self, uid: int) -> None:
        self.uids.discard(uid)


@pytest.mark.parametrize(("setting", "before", "after_configure", "after_sessions"), [
    ("sessions", {DAEMON}, {DAEMON}, {DAEMON, NOBODY}),  # kept across restarts, grows with sessions
    ("none", {DAEMON}, set(), set()),
    (["nobody", "no-such-login-here"], {DAEMON}, {NOBODY}, {NOBODY}),
])
def test_the_setting_decides_the_set(setting, before, after_configure, after_sessions):
    kernel = Logins(before)
    logins = RestrictedLogins(kernel, setting)
    assert logins.configure() == after_configure == kernel.uids
    for login in ("nobody", "root", "no-such-login-here"):  # root is never restricted
        logins.session_opened(login)
    assert kernel.uids == after_sessions
