"""Every service's check of control requests: who signed it, and may they do it.

ServiceContext.add_endpoint runs RequestAuth.check before each handler. The
signing scheme and the role logic are ringfence.auth (shared with the CLI);
this module adds the state: the nonces seen, and users and roles from the
policy bucket. Those are mirrored by a KV watch; whenever the mirror does not
confirm a request (a user or role added a moment ago), the bucket is read
directly before the request is refused, so a change takes effect at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.js.kv import KeyValue
from nats.micro.request import Request

from .. import auth
from ..contract import names
from ..contract.api import ApiError
from ..contract.resources import Role, User
from . import kv_read
from .kv_mirror import KvMirror

log = logging.getLogger(__name__)

Action = tuple[str, str]  # (resource, verb), e.g. ("lock", "create")
ActionResolver = Callable[[Request], Awaitable[Iterable[Action]]]


class SelfAuthorized:
    """An endpoint whose request carries its own proof (a join token checked by the handler):
    no operator identity is asked for. Use only where the handler refuses everything else."""


SELF_AUTHORIZED = SelfAuthorized()
ActionSpec = Action | ActionResolver | SelfAuthorized | None
# An endpoint registered without an action: only roles allowing every verb on every resource.
ADMIN_ONLY: tuple[Action, ...] = ((auth.WILDCARD, auth.WILDCARD),)

T = TypeVar("T")
COUNTERS = ("requests_unauthenticated", "requests_denied")


def _decoder(type_: type[T]) -> Callable[[str, bytes], T]:
    def decode(_key: str, raw: bytes) -> T:
        return msgspec.json.decode(raw, type=type_)

    return decode


class OperatorDirectory:
    """Users and roles as stored by the policy service."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.users: KvMirror[User] = KvMirror(nc, names.POLICY_BUCKET, names.USER_KEY_PREFIX + ">", _decoder(User))
        self.roles: KvMirror[Role] = KvMirror(nc, names.POLICY_BUCKET, names.ROLE_KEY_PREFIX + ">", _decoder(Role))
        self._kv: KeyValue | None = None

    def tasks(self, stop: asyncio.Event) -> list[Awaitable[Any]]:
        return [self.users.run(stop), self.roles.run(stop)]

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


async def resolve_actions(spec: ActionSpec, req: Request) -> list[Action]:
    if spec is None:
        return list(ADMIN_ONLY)
    if isinstance(spec, tuple):
        return [spec]
    result = spec(req)
    if inspect.isawaitable(result):
        result = await result
    return list(result)


class RequestAuth:
    """`mode` "required": signed, fresh, not replayed, registered key, allowed by the roles.
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

    async def check(self, req: Request, spec: ActionSpec) -> str:
        """The acting user's name; ApiError (kind access_denied) when the request is refused."""
        if spec is SELF_AUTHORIZED:
            return ""
        if not self.required:
            return (req.headers or {}).get(auth.HEADER_ACTOR, "")
        assert self.directory is not None
        now = self.clock()
        try:
            signed = auth.verify_request(req.headers, req.subject, req.data or b"", now)
            user = await self.directory.user(signed.actor)
            if user is None or user.spec.operator_nkey != signed.nkey:
                user = await self.directory.user(signed.actor, fresh=True)
            auth.check_registered(signed, user.spec.operator_nkey if user else None)
            self.nonces.check_and_add(signed, now)
        except auth.AuthError as exc:
            self.counters["requests_unauthenticated"] += 1
            log.warning("refused a request on %s: %s", req.subject, exc)
            raise ApiError(str(exc), auth.ACCESS_DENIED_KIND) from None
        assert user is not None
        actions = await resolve_actions(spec, req)
        denied = auth.first_denied(await self.directory.roles_of(user), actions)
        if denied:  # the mirror may lag a change made a moment ago: ask the bucket itself
            fresh = await self.directory.user(signed.actor, fresh=True)
            roles = await self.directory.roles_of(fresh, fresh=True) if fresh is not None else []
            if fresh is None or fresh.spec.operator_nkey != signed.nkey:
                roles = []
            denied = auth.first_denied(roles, actions)
        if denied:
            resource, verb = denied
            self.counters["requests_denied"] += 1
            log.info('access denied: user "%s" may not %s %s (%s)', signed.actor, verb, resource, req.subject)
            raise ApiError(auth.access_denied(verb, resource), auth.ACCESS_DENIED_KIND)
        return signed.actor
