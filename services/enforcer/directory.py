"""Users and roles as this node sees them (mirrored from the policy bucket)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client

from ringfence.contract import names
from ringfence.contract.resources import Role, User
from ringfence.runtime.kv_mirror import KvMirror

from .ssh_identity import normalize_public_key


class Directory:
    def __init__(self, nc: Client, counters: dict | None = None) -> None:
        self.users: KvMirror[User] = KvMirror(nc, names.POLICY_BUCKET, names.USER_KEY_PREFIX + ">", User,
                                              self._reindex, counters)
        self.roles: KvMirror[Role] = KvMirror(nc, names.POLICY_BUCKET, names.ROLE_KEY_PREFIX + ">", Role,
                                              self._notify, counters)
        self.on_change: list[Callable[[], None]] = []  # users or roles changed
        self.key_owners: dict[tuple[str, str], str] = {}
        self._by_name: dict[str, User] = {}

    def _notify(self) -> None:
        for callback in self.on_change:
            callback()

    def _reindex(self) -> None:
        owners, by_name = {}, {}
        for user in self.users.values.values():
            by_name[user.metadata.name] = user
            for line in user.spec.ssh_public_keys:
                key = normalize_public_key(line)
                if key:
                    owners[key] = user.metadata.name
        self.key_owners, self._by_name = owners, by_name
        self._notify()

    def roles_of(self, user: str) -> list[str]:
        found = self._by_name.get(user)
        return list(found.spec.roles) if found else []

    def role(self, name: str) -> Role | None:
        return self.roles.values.get(names.role_key(name))

    def tasks(self, stop: asyncio.Event) -> list:
        return [self.users.run(stop), self.roles.run(stop)]
