"""Every service's check of control requests: who signed it, is that operator locked
out, and may they do it.

ServiceContext.add_endpoint authenticates each request, then authorizes the
actions it takes. The signing scheme and the role logic are ringfence.auth
(shared with the CLI); locks and locking modes are ringfence.locking (shared
with the enforcer). This module adds the state: the nonces seen, and users,
roles, locks and the cluster locking mode, mirrored by KV watches. Whenever
the mirror does not confirm a request (a user or role added a moment ago),
the bucket is read directly before the request is refused, so a change takes
effect at once.

Locks bind operators as they bind sessions (seed 004: "Teleport will reject
new API requests"): a request from a user that a lock in force targets (by
user or by one of its roles) is refused with the lock's message, and in
strict mode every request is refused while the lock view is not known to be
current. A locked operator cannot lift their own lock: another operator
whose roles allow it must (or the lock expires).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.js.kv import KeyValue
from nats.micro.request import Request

from .. import auth, locking
from ..contract import names
from ..contract.api import ApiError
from ..contract.resources import ClusterAuthPreference, Lock, Role, User
from . import kv_read
from .kv_mirror import KvMirror

log = logging.getLogger(__name__)

Action = tuple[str, str]  # (resource, verb), e.g. ("lock", "create")
# Given the decoded request (a runtime.service.Call; the raw Request for endpoints not converted yet).
ActionResolver = Callable[[Any], Awaitable[Iterable[Action]]]


class SelfAuthorized:
    """An endpoint whose request carries its own proof (a join token checked by the handler):
    no operator identity is asked for. Use only where the handler refuses everything else."""


SELF_AUTHORIZED = SelfAuthorized()
ActionSpec = Action | ActionResolver | SelfAuthorized | None
# An endpoint registered without an action: only roles allowing every verb on every resource.
ADMIN_ONLY: tuple[Action, ...] = ((auth.WILDCARD, auth.WILDCARD),)

T = TypeVar("T")
COUNTERS = ("requests_unauthenticated", "requests_denied", "requests_locked")


class OperatorDirectory:
    """Users, roles, locks and the cluster locking mode, as stored by the policy and locks services."""

    def __init__(self, nc: Client, max_staleness: float, counters: dict[str, int] | None = None) -> None:
        self.nc = nc
        self.users: KvMirror[User] = KvMirror(nc, names.POLICY_BUCKET, names.USER_KEY_PREFIX + ">", User,
                                              counters=counters)
        self.roles: KvMirror[Role] = KvMirror(nc, names.POLICY_BUCKET, names.ROLE_KEY_PREFIX + ">", Role,
                                              counters=counters)
        self.locks: KvMirror[Lock] = KvMirror(nc, names.LOCKS_BUCKET, ">", Lock, counters=counters)
        self.cap: KvMirror[ClusterAuthPreference] = KvMirror(nc, names.POLICY_BUCKET, names.CAP_KEY,
                                                             ClusterAuthPreference, counters=counters)
        self.max_staleness = max_staleness
        self.started = time.monotonic()
        self._kv: KeyValue | None = None

    def tasks(self, stop: asyncio.Event) -> list[Awaitable[Any]]:
        return [self.users.run(stop), self.roles.run(stop), self.locks.run(stop), self.cap.run(stop)]

    async def _read(self, key: str, type_: type[T]) -> T | None:
        if self._kv is None:
            # The stream leader answers: an operator added a moment ago is found (runtime/kv_read.py).
            self._kv = await kv_read.open_bucket(self.nc.jetstream(), names.POLICY_BUCKET)
        try:
            entry = await kv_read.get(self._kv, key)  # waits out a leader election
        except kv_read.StaleSnapshotError as exc:
            raise ApiError(f"cannot check the operator's identity now: {exc}; try again", "unavailable") from None
        if entry is None or not entry.value:
            return None
        try:
            return msgspec.json.decode(entry.value, type=type_)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("%s/%s does not decode (%s); ignoring it", names.POLICY_BUCKET, key, exc)
            return None

    async def user(self, name: str, fresh: bool = False) -> User | None:
        if not fresh:
            return self.users.values.get(names.user_key(name))
        return await self._read(names.user_key(name), User)

    async def roles_of(self, user: User, fresh: bool = False) -> list[Role]:
        """The user's roles that exist (a user may name roles not created yet)."""
        found = []
        for role_name in user.spec.roles:
            key = names.role_key(role_name)
            role = await self._read(key, Role) if fresh else self.roles.values.get(key)
            if role is not None:
                found.append(role)
        return found

    def lock_refusal(self, user: User, roles: list[Role], now: dt.datetime) -> str | None:
        """Why locks keep this operator out now, or None: a lock in force on the user or one of
        its roles; in strict mode (cluster-wide or any of its roles), also a lock view that has
        not been confirmed current for max_staleness."""
        last = self.locks.synced_at or self.started
        if time.monotonic() - last > self.max_staleness:
            cap = self.cap.values.get(names.CAP_KEY)
            cluster_mode = cap.spec.locking_mode if cap else "best_effort"
            if locking.locking_mode(cluster_mode, [r.spec.options.lock for r in roles]) == "strict":
                return locking.PREVENTIVE_LOCKOUT
        found = locking.matching_locks(self.locks.values.values(), locking.Interaction.of_operator(user), now)
        return locking.lock_message(found[0]) if found else None


async def resolve_actions(spec: ActionSpec, subject: Any) -> list[Action]:
    """The actions a request takes: `subject` is what the resolver is given (see ActionResolver)."""
    if spec is None:
        return list(ADMIN_ONLY)
    if isinstance(spec, tuple):
        return [spec]
    result = spec(subject)
    if inspect.isawaitable(result):
        result = await result
    return list(result)


@dataclass(frozen=True)
class Operator:
    """Who sent a request: the verified user with operator_auth required; as stated when off."""

    actor: str
    user: User | None = None  # None when operator_auth is off
    nkey: str = ""


class RequestAuth:
    """`mode` "required": signed, fresh, not replayed, registered key, not locked out, allowed by the roles.
    `mode` "off": everything is accepted and the actor is whatever Ringfence-Actor says."""

    def __init__(self, mode: str, directory: OperatorDirectory | None, counters: dict[str, int],
                 clock: Callable[[], float] = time.time) -> None:
        self.mode = mode
        self.directory = directory
        self.counters = counters
        self.clock = clock
        self.nonces = auth.NonceCache()
        for name in COUNTERS:
            counters.setdefault(name, 0)

    @property
    def required(self) -> bool:
        return self.mode == "required"

    async def authenticate(self, req: Request) -> Operator:
        """The operator who signed `req`; ApiError (kind access_denied) when it is not signed right."""
        if not self.required:
            return Operator((req.headers or {}).get(auth.HEADER_ACTOR, ""))
        assert self.directory is not None
        now = self.clock()
        try:
            signed = auth.verify_request(req.headers, req.subject, req.data or b"", now)
            key = auth.vouching_key(req.headers, signed, now)  # a console request: its grant's key
            user = await self.directory.user(signed.actor)
            if user is None or user.spec.operator_nkey != key:
                user = await self.directory.user(signed.actor, fresh=True)
            auth.check_registered(signed, user.spec.operator_nkey if user else None, key)
            self.nonces.check_and_add(signed, now)
        except auth.AuthError as exc:
            self.counters["requests_unauthenticated"] += 1
            log.warning("refused a request on %s: %s", req.subject, exc)
            raise ApiError(str(exc), auth.ACCESS_DENIED_KIND) from None
        assert user is not None
        return Operator(signed.actor, user, key)

    async def authorize(self, op: Operator, actions: list[Action], subject: str) -> None:
        """ApiError (kind access_denied) unless `op` is not locked out and its roles allow every action."""
        if not self.required:
            return
        assert self.directory is not None and op.user is not None
        roles = await self.directory.roles_of(op.user)
        locked = self.directory.lock_refusal(op.user, roles, dt.datetime.now(dt.UTC))
        if locked:
            self.counters["requests_locked"] += 1
            log.info('refused a request of user "%s" on %s: %s', op.actor, subject, locked)
            raise ApiError(locked, auth.ACCESS_DENIED_KIND)
        denied = auth.first_denied(roles, actions)
        if denied:  # the mirror may lag a change made a moment ago: ask the bucket itself
            fresh = await self.directory.user(op.actor, fresh=True)
            roles = await self.directory.roles_of(fresh, fresh=True) if fresh is not None else []
            if fresh is None or fresh.spec.operator_nkey != op.nkey:
                roles = []
            denied = auth.first_denied(roles, actions)
        if denied:
            resource, verb = denied
            self.counters["requests_denied"] += 1
            log.info('access denied: user "%s" may not %s %s (%s)', op.actor, verb, resource, subject)
            raise ApiError(auth.access_denied(verb, resource), auth.ACCESS_DENIED_KIND)
