"""NATS side of the policy service: the create/get/delete endpoints over the policy bucket."""

from __future__ import annotations

import logging

import msgspec
from nats.errors import NoRespondersError
from nats.js.kv import KeyValue

from ringfence.contract import api, names
from ringfence.contract import resources as r
from ringfence.contract.documents import CreateDocuments, decode_create_request
from ringfence.contract.resources import MAX_NAME_LEN
from ringfence.runtime import kv_batch, kv_read
from ringfence.runtime.audit_outbox import Outbox
from ringfence.runtime.audit_publish import publish_change_events
from ringfence.runtime.service import Call, ServiceContext

from . import core
from .fleet import Fleet

log = logging.getLogger(__name__)

STATIC_KEYS = {names.CAP_KEY, names.NETWORKING_KEY, names.RECORDING_CONFIG_KEY}
# Room for the KV subject and headers next to a value within NATS's max_payload.
MESSAGE_OVERHEAD = 1024


class Adapter:
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.kv: KeyValue = await kv_read.open_bucket(ctx.js, names.POLICY_BUCKET)
        for counter in ("changes_applied", "requests_rejected", "audit_publish_failures"):
            ctx.counters.setdefault(counter, 0)
        self.outbox = Outbox(ctx, names.POLICY_BUCKET, names.POLICY)
        await self.outbox.start()  # events of changes a killed predecessor wrote but did not publish
        await self._apply_config_file()
        # Writers are exclusive (ctx.write_lock): "created" vs "updated" and the order of audit
        # events match the order in which changes were written.
        await ctx.add_endpoint("create", names.api_subject(names.POLICY_API, "create"), self.create,
                               request=decode_create_request, action=self._create_actions, exclusive=True)
        await ctx.add_endpoint("get", names.api_subject(names.POLICY_API, "get"), self.get,
                               request=api.GetRequest, action=self._get_actions)
        await ctx.add_endpoint("delete", names.api_subject(names.POLICY_API, "delete"), self.delete,
                               request=api.DeleteRequest, action=self._delete_actions, exclusive=True)
        await ctx.add_endpoint("update_user", names.api_subject(names.POLICY_API, "update_user"), self.update_user,
                               request=api.UserUpdateRequest, action=self._update_user_actions, exclusive=True)
        self.fleet = Fleet(self)
        await self.fleet.start()

    async def stop(self) -> None:
        if hasattr(self, "fleet"):
            await self.fleet.stop()
        if hasattr(self, "outbox"):
            await self.outbox.stop()

    # --- what each request does, for the role check (ServiceContext.add_endpoint) ---------

    async def _create_actions(self, call: Call[CreateDocuments]) -> list[tuple[str, str]]:
        """(kind, "create") per document, or (kind, "update") when it replaces a stored one."""
        actions = []
        for doc in call.body.docs:
            kind, key = core.document_key(doc)
            if kind:  # a document of no known kind is refused by the create itself
                actions.append((kind, "update" if key and await self._read(key, call) is not None else "create"))
        return actions

    async def _get_actions(self, call: Call[api.GetRequest]) -> list[tuple[str, str]]:
        look = core.lookup(call.body.kind, call.body.name)
        return [(look.kind, "read" if look.key else "list")]

    async def _delete_actions(self, call: Call[api.DeleteRequest]) -> list[tuple[str, str]]:
        return [(core.canonical_kind(call.body.kind), "delete")]

    async def _update_user_actions(self, call: Call[api.UserUpdateRequest]) -> list[tuple[str, str]]:
        key = names.user_key(call.body.name) if len(call.body.name) <= MAX_NAME_LEN else ""
        exists = bool(key) and await self._read(key, call) is not None
        return [("user", "update" if exists or not call.body.create else "create")]

    # --- endpoints ------------------------------------------------------------------

    async def create(self, call: Call[CreateDocuments]) -> api.CreateResult:
        try:
            return await self._create(call)
        except api.ApiError:
            self.ctx.counters["requests_rejected"] += 1
            raise

    async def _create(self, call: Call[CreateDocuments]) -> api.CreateResult:
        checked = core.check_documents(call.body.docs)
        keys = {core.storage_key(d.resource) for d in checked}
        existing_keys = {k for k in keys if await self._read(k, call) is not None}
        wanted_roles = core.referenced_roles(checked)
        existing_roles = {n for n in wanted_roles if await self._read(names.role_key(n), call) is not None}
        max_value = self.ctx.nc.max_payload - MESSAGE_OVERHEAD
        static_keys = {k for k in keys & STATIC_KEYS if core.from_config_file(await self._read(k, call))}
        changes = core.plan_create(checked, existing_keys, existing_roles, call.actor, max_value, static_keys)
        problems = [] if call.body.dry_run else await self._apply(changes)
        return api.CreateResult(messages=core.create_messages(changes) + problems)

    async def get(self, call: Call[api.GetRequest]) -> list[msgspec.Raw]:
        look = core.lookup(call.body.kind, call.body.name)
        if look.key:
            value = await self._read(look.key, call)
            values = [value] if value is not None else []
        else:
            values = await self._read_prefix(look.prefix)
        return core.get_result(look, values)

    async def delete(self, call: Call[api.DeleteRequest]) -> api.DeleteResult:
        look = core.lookup(call.body.kind, call.body.name)
        value = await self._read(look.key, call) if look.key else None
        change = core.plan_delete(look, value is not None, call.actor, static=core.from_config_file(value))
        problems = await self._apply([change])
        return api.DeleteResult(message="\n".join([change.message, *problems]))

    async def _apply_config_file(self) -> None:
        """The singletons the config file sets (auth_service), written as the original's auth server
        does at start-up; those it no longer sets go back to defaults."""
        async with self.ctx.write_lock:
            desired = core.static_resources(self.ctx.config.auth_service)
            changes = core.plan_static(desired, {key: await self._read(key) for key in desired})
            for line in await self._apply(changes) if changes else []:
                log.warning("%s", line)

    async def update_user(self, call: Call[api.UserUpdateRequest]) -> api.CreateResult:
        """`users add` / `users update`: read, change what was asked, write back, under the write lock."""
        if len(call.body.name) > MAX_NAME_LEN:
            raise core.not_found(core.Lookup("user", call.body.name))
        raw = await self._read(names.user_key(call.body.name), call)
        stored = msgspec.json.decode(raw, type=r.User) if raw is not None else None
        change = core.plan_user_update(call.body, stored, call.actor)
        problems = await self._apply([change])
        return api.CreateResult(messages=[change.message, *problems])

    # --- KV and audit -------------------------------------------------------------------

    # Reads see every write acknowledged before them, also on a cluster (runtime/kv_read.py).
    async def _read(self, key: str, call: Call | None = None) -> bytes | None:
        """The value of `key`, read once per call (its permission check and its handler share it)."""
        if call is not None and key in call.reads:
            return call.reads[key]
        try:
            entry = await kv_read.get(self.kv, key)
        except kv_read.StaleSnapshotError as exc:
            raise api.ApiError(f"cannot read the policy bucket: {exc}", "unavailable") from None
        value = entry.value if entry is not None else None
        if call is not None:
            call.reads[key] = value
        return value

    async def _read_prefix(self, prefix: str) -> list[bytes]:
        """Current values under `prefix`, ordered by key (stable listings)."""
        try:
            entries = await kv_read.snapshot(self.ctx.js, self.kv, prefix + ">")
        except kv_read.StaleSnapshotError as exc:
            raise api.ApiError(f"cannot read the policy bucket: {exc}", "unavailable") from None
        return [entries[k].value for k in sorted(entries) if entries[k].value]

    async def _apply(self, changes: list[core.Change]) -> list[str]:
        """Write every change (all or none, even if this process dies meanwhile), each carrying
        its event, then publish the events; warnings for events not published yet."""
        try:
            seq = await kv_batch.write_all(self.ctx.nc, names.POLICY_BUCKET,
                                           [kv_batch.KvWrite(c.key, c.value, last=c.last,
                                                             event=self.outbox.header(c.event) if c.event else None)
                                            for c in changes])
        except (kv_batch.WriteOutcomeUnknown, NoRespondersError) as exc:
            raise api.ApiError(kv_batch.unconfirmed_message(exc, "policy", "ringfence get"), "unavailable") from None
        except kv_batch.BatchError as exc:
            if exc.err_code == kv_batch.WRONG_LAST_SEQUENCE:
                raise api.ApiError("nothing was changed: another request changed the same entries meanwhile; "
                                   "try again", "conflict") from None
            raise api.ApiError(f"nothing was changed: the NATS server refused the write ({exc})",
                               "unavailable") from None
        for change in changes:
            self.ctx.counters["changes_applied"] += 1
            if change.event:
                log.info("%s (actor %r)", change.message, change.event.user)
        # Events after every write: the audit log never records a change that did not happen.
        warnings = await publish_change_events(self.ctx, [change.event for change in changes if change.event])
        await self.outbox.published(seq, all_published=not warnings)
        return warnings


def make_adapter(_args) -> Adapter:
    return Adapter()
