"""NATS side of the policy service: the create/get/delete endpoints over the policy bucket."""

from __future__ import annotations

import asyncio
import logging

from nats.errors import NoRespondersError
from nats.js.kv import KeyValue
from nats.micro.request import Request

from ringfence.contract import api, names
from ringfence.runtime import kv_batch, kv_read
from ringfence.runtime.audit_outbox import Outbox
from ringfence.runtime.audit_publish import publish_change_events
from ringfence.runtime.service import ServiceContext, request_actor

from . import core
from .fleet import Fleet
from .fleet_core import decode_body

log = logging.getLogger(__name__)

# Room for the KV subject and headers next to a value within NATS's max_payload.
MESSAGE_OVERHEAD = 1024


def actor_of(req: Request) -> str:
    """The user the request acts as: its verified operator identity (see ringfence.runtime.service)."""
    return request_actor(req)


class Adapter:
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.kv: KeyValue = await kv_read.open_bucket(ctx.js, names.POLICY_BUCKET)
        # One writer at a time in this process, so "created" vs "updated" and the
        # order of audit events match the order in which changes were written.
        self.write_lock = asyncio.Lock()
        for counter in ("changes_applied", "requests_rejected", "audit_publish_failures"):
            ctx.counters.setdefault(counter, 0)
        self.outbox = Outbox(ctx, names.POLICY_BUCKET, names.POLICY)
        await self.outbox.start()  # events of changes a killed predecessor wrote but did not publish
        await ctx.add_endpoint("create", names.api_subject(names.POLICY_API, "create"), self.create,
                               action=self._create_actions)
        await ctx.add_endpoint("get", names.api_subject(names.POLICY_API, "get"), self.get,
                               action=self._get_actions)
        await ctx.add_endpoint("delete", names.api_subject(names.POLICY_API, "delete"), self.delete,
                               action=self._delete_actions)
        self.fleet = Fleet(self)
        await self.fleet.start()

    async def stop(self) -> None:
        if hasattr(self, "fleet"):
            await self.fleet.stop()
        if hasattr(self, "outbox"):
            await self.outbox.stop()

    # --- what each request does, for the role check (ServiceContext.add_endpoint) ---------

    async def _create_actions(self, req: Request) -> list[tuple[str, str]]:
        """(kind, "create") per document, or (kind, "update") when it replaces a stored one."""
        docs, _ = core.decode_create_request(req.data)
        actions = []
        for doc in docs:
            kind, key = core.document_key(doc)
            if kind:  # a document of no known kind is refused by the create itself
                actions.append((kind, "update" if key and await self._read(key) is not None else "create"))
        return actions

    async def _get_actions(self, req: Request) -> list[tuple[str, str]]:
        request = decode_body(req.data, api.GetRequest)
        look = core.lookup(request.kind, request.name)
        return [(look.kind, "read" if look.key else "list")]

    async def _delete_actions(self, req: Request) -> list[tuple[str, str]]:
        request = decode_body(req.data, api.DeleteRequest)
        return [(core.canonical_kind(request.kind), "delete")]

    # --- endpoints ------------------------------------------------------------------

    async def create(self, req: Request) -> bytes:
        try:
            return await self._create(req)
        except api.ApiError:
            self.ctx.counters["requests_rejected"] += 1
            raise

    async def _create(self, req: Request) -> bytes:
        docs, dry_run = core.decode_create_request(req.data)
        checked = core.check_documents(docs)
        async with self.write_lock:
            keys = {core.storage_key(d.resource) for d in checked}
            existing_keys = {k for k in keys if await self._read(k) is not None}
            wanted_roles = core.referenced_roles(checked)
            existing_roles = {n for n in wanted_roles if await self._read(names.role_key(n)) is not None}
            max_value = self.ctx.nc.max_payload - MESSAGE_OVERHEAD
            changes = core.plan_create(checked, existing_keys, existing_roles, actor_of(req), max_value)
            problems = [] if dry_run else await self._apply(changes)
        return api.ok_reply(api.CreateResult(messages=core.create_messages(changes) + problems))

    async def get(self, req: Request) -> bytes:
        request = decode_body(req.data, api.GetRequest)
        look = core.lookup(request.kind, request.name)
        if look.key:
            value = await self._read(look.key)
            values = [value] if value is not None else []
        else:
            values = await self._read_prefix(look.prefix)
        return api.ok_reply(core.get_result(look, values))

    async def delete(self, req: Request) -> bytes:
        request = decode_body(req.data, api.DeleteRequest)
        look = core.lookup(request.kind, request.name)
        async with self.write_lock:
            exists = bool(look.key) and await self._read(look.key) is not None
            change = core.plan_delete(look, exists, actor_of(req))
            problems = await self._apply([change])
        return api.ok_reply(api.DeleteResult(message="\n".join([change.message, *problems])))

    # --- KV and audit -------------------------------------------------------------------

    # Reads see every write acknowledged before them, also on a cluster (runtime/kv_read.py).
    async def _read(self, key: str) -> bytes | None:
        try:
            entry = await kv_read.get(self.kv, key)
        except kv_read.StaleSnapshotError as exc:
            raise api.ApiError(f"cannot read the policy bucket: {exc}", "unavailable") from None
        return entry.value if entry is not None else None

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
