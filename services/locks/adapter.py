"""NATS side of the locks service: create/lock/get/delete/unlock over the locks
bucket, and housekeeping that deletes locks once they expire.

Expiry is not what makes a lock stop: the enforcer evaluates `expires` itself
at the instant it acts (ringfence.locking). Deleting expired locks keeps the
bucket and `get locks` tidy and records a lock.deleted event (reason
"expired"). A KV mirror (runtime/kv_mirror.py) keeps a view of every lock,
whoever wrote it, re-read in full every 30 s and after a reconnect; one timer
sleeps until the next expiry in that view. Deletes are conditional on the
revision seen, so when several locks services run, one of them removes a
given lock and records it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import uuid
from typing import Any

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError
from nats.js.kv import KeyValue

from ringfence import locking
from ringfence.contract import api, names
from ringfence.contract import resources as r
from ringfence.contract.documents import CreateDocuments, decode_create_request
from ringfence.runtime import kv_batch, kv_read
from ringfence.runtime.audit_outbox import Outbox
from ringfence.runtime.audit_publish import publish_change_events
from ringfence.runtime.kv_mirror import UNDECODABLE, KvMirror
from ringfence.runtime.service import Call, ServiceContext

from . import core

log = logging.getLogger(__name__)

TIMER_CAP = 60.0  # the longest the expiry timer sleeps (clocks jump)
RETRY_AFTER_ERROR = 5.0
WRONG_LAST_SEQUENCE = 10071  # JetStream: the key moved on since we read it

COUNTERS = ("locks_created", "locks_deleted", "locks_expired", "requests_rejected", "audit_publish_failures",
            "expiry_errors")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Adapter:
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.kv: KeyValue = await kv_read.open_bucket(ctx.js, names.LOCKS_BUCKET)
        self.view_changed = asyncio.Event()
        # Every stored lock, whoever wrote it: what the expiry timer looks at.
        self.view: KvMirror[r.Lock] = KvMirror(ctx.nc, names.LOCKS_BUCKET, ">", r.Lock, self.view_changed.set,
                                               ctx.counters)
        self.expired_here: set[tuple[str, int]] = set()  # (name, revision) deleted, until the view sees it
        self.stopping = asyncio.Event()
        for counter in COUNTERS:
            ctx.counters.setdefault(counter, 0)
        self.outbox = Outbox(ctx, names.LOCKS_BUCKET, names.LOCKS)
        await self.outbox.start()  # events of changes a killed predecessor wrote but did not publish
        self.tasks = [asyncio.create_task(self.view.run(self.stopping), name="locks-view"),
                      asyncio.create_task(self._expire(), name="locks-expire")]
        # Writers are exclusive (ctx.write_lock): "created" vs "updated" and the order of
        # audit events follow the order of the writes.
        for verb, handler, request, action, exclusive in (
                ("create", self.create, decode_create_request, self._create_actions, True),
                ("lock", self.lock, api.LockRequest, ("lock", "create"), True),
                ("get", self.get, api.GetRequest, self._get_actions, False),
                ("delete", self.delete, api.DeleteRequest, ("lock", "delete"), True),
                ("unlock", self.unlock, api.UnlockRequest, ("lock", "delete"), True)):
            await ctx.add_endpoint(verb, names.api_subject(names.LOCKS_API, verb), self._counted(handler),
                                   request=request, action=action, exclusive=exclusive)

    async def stop(self) -> None:
        self.stopping.set()
        if hasattr(self, "outbox"):
            await self.outbox.stop()
        for task in getattr(self, "tasks", []):
            task.cancel()
        for task in getattr(self, "tasks", []):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _counted(self, handler):
        async def serve(call: Call) -> Any:
            try:
                return await handler(call)
            except api.ApiError:
                self.ctx.counters["requests_rejected"] += 1
                raise

        return serve

    async def _create_actions(self, call: Call[CreateDocuments]) -> list[tuple[str, str]]:
        """create -f: ("lock", "update") for a document replacing a stored lock, else ("lock", "create")."""
        actions = []
        for doc in call.body.docs:
            md = doc.get("metadata") if isinstance(doc, dict) else None
            name = md.get("name") if isinstance(md, dict) else None
            exists = isinstance(name, str) and core.valid_name(name) and await self._read(name, call) is not None
            actions.append(("lock", "update" if exists else "create"))
        return actions

    async def _get_actions(self, call: Call[api.GetRequest]) -> list[tuple[str, str]]:
        return [("lock", "read" if call.body.name else "list")]

    # --- endpoints ------------------------------------------------------------------

    async def create(self, call: Call[CreateDocuments]) -> api.CreateResult:
        checked = core.check_documents(call.body.docs)
        existing = {d.lock.metadata.name for d in checked if await self._read(d.lock.metadata.name, call)}
        changes = core.plan_create(checked, existing, call.actor, utcnow())
        problems = [] if call.body.dry_run else await self._apply(changes)
        return api.CreateResult(messages=core.create_messages(changes) + problems)

    async def lock(self, call: Call[api.LockRequest]) -> api.LockResult:
        name = str(uuid.uuid4())
        change = core.plan_lock(call.body, name, call.actor, utcnow())
        problems = await self._apply([change], create_only=True)
        return api.LockResult(name=name, message="\n".join([change.message, *problems]))

    async def get(self, call: Call[api.GetRequest]) -> list[r.Lock]:
        request = call.body
        core.check_kind(request.kind)
        now = utcnow()
        if request.name:
            stored = await self._read(request.name, call) if core.valid_name(request.name) else None
            return core.get_one(request.name, stored.lock if stored else None, now)
        return core.listing([s.lock for s in (await self._read_all()).values()], now)

    async def delete(self, call: Call[api.DeleteRequest]) -> api.DeleteResult:
        request = call.body
        core.check_kind(request.kind)
        stored = await self._read(request.name, call) if core.valid_name(request.name) else None
        change = core.plan_delete(request.name, stored, call.actor)
        problems = await self._apply([change])
        return api.DeleteResult(message="\n".join([change.message, *problems]))

    async def unlock(self, call: Call[api.UnlockRequest]) -> api.UnlockResult:
        changes, message = core.plan_unlock(call.body.target, await self._read_all(), call.actor, utcnow())
        problems = await self._apply(changes)
        return api.UnlockResult(names=[c.key for c in changes], message="\n".join([message, *problems]))

    # --- KV ----------------------------------------------------------------------------

    def _decode(self, key: str, value: bytes | None) -> r.Lock | None:
        try:
            return msgspec.json.decode(value or b"", type=r.Lock)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.ctx.counters[UNDECODABLE] += 1
            log.error("lock %r in KV does not decode (%s); ignoring it", key, exc)
            return None

    # Reads see every write acknowledged before them, also on a cluster (runtime/kv_read.py).
    async def _read(self, key: str, call: Call | None = None) -> core.Stored | None:
        """The lock stored under `key`, read once per call (its permission check and its handler share it)."""
        if call is not None and key in call.reads:
            return call.reads[key]
        try:
            entry = await kv_read.get(self.kv, key)
        except kv_read.StaleSnapshotError as exc:
            raise api.ApiError(f"cannot read the locks bucket: {exc}", "unavailable") from None
        lock = self._decode(key, entry.value) if entry is not None else None
        stored = core.Stored(lock, entry.revision) if lock and entry else None
        if call is not None:
            call.reads[key] = stored
        return stored

    async def _read_all(self) -> dict[str, core.Stored]:
        """Every lock stored now, with its revision."""
        try:
            entries = await kv_read.snapshot(self.ctx.js, self.kv)
        except kv_read.StaleSnapshotError as exc:
            raise api.ApiError(f"cannot read the locks bucket: {exc}", "unavailable") from None
        found: dict[str, core.Stored] = {}
        for key, entry in entries.items():
            if entry.value and (lock := self._decode(key, entry.value)):
                found[key] = core.Stored(lock, entry.revision)
        return found

    async def _apply(self, changes: list[core.Change], create_only: bool = False) -> list[str]:
        """Write every change, then publish its event; warnings for events that were lost.

        The changes of a request are written all or none, even if this process dies
        meanwhile (runtime/kv_batch.py); only an `unlock` of more locks than one batch
        holds is written in several. Events follow the writes, so the audit log never
        records a change that did not happen; when a batch fails, the ones before it
        still get theirs."""
        applied: list[core.Change] = []
        seq = 0
        try:
            for start in range(0, len(changes), kv_batch.MAX_WRITES):
                batch = changes[start : start + kv_batch.MAX_WRITES]
                if create_only:  # `ringfence lock`: one new key
                    for change in batch:
                        seq = await self._create_key(change)
                else:
                    seq = await self._write_all(batch)
                applied += batch
                for change in batch:
                    self.ctx.counters["locks_deleted" if change.value is None else "locks_created"] += 1
                    log.info("%s (actor %r)", change.message, change.event.user)
        finally:
            warnings = await publish_change_events(self.ctx, [change.event for change in applied])
            await self.outbox.published(seq, all_published=not warnings)
        return warnings

    def _write(self, change: core.Change) -> kv_batch.KvWrite:
        """The KV write of a change, carrying its audit event."""
        return kv_batch.KvWrite(change.key, change.value, last=change.last, event=self.outbox.header(change.event))

    async def _create_key(self, change: core.Change) -> int:
        """Store a new lock (`ringfence lock`: a new UUID, so nothing can be in its way); returns
        its stream sequence."""
        write = dataclasses.replace(self._write(change), last=0)

        async def create() -> int:
            try:
                return await kv_batch.write_one(self.ctx.js, names.LOCKS_BUCKET, write)
            except (NatsTimeoutError, APIError) as exc:
                if isinstance(exc, APIError) and exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                # Sent to a server that died, or the key is there already (stored by a try whose ack
                # was lost)? The leader knows what is stored; if nothing, send it again.
                stored = await kv_read.get(self.kv, change.key)
                if stored is None:
                    raise NoStreamResponseError from None
                if stored.value != change.value:
                    raise
                return stored.revision or 0
        try:
            return await kv_batch.while_leaderless(create)
        except (NoStreamResponseError, NatsTimeoutError, kv_read.StaleSnapshotError) as exc:
            raise _unconfirmed(exc) from None

    async def _write_all(self, changes: list[core.Change]) -> int:
        writes = [self._write(c) for c in changes]
        try:
            return await kv_batch.write_all(self.ctx.nc, names.LOCKS_BUCKET, writes)
        except (kv_batch.WriteOutcomeUnknown, NoRespondersError) as exc:
            raise _unconfirmed(exc) from None
        except kv_batch.BatchError as exc:
            if exc.err_code == kv_batch.WRONG_LAST_SEQUENCE:
                removing = [c.key for c in changes if c.last is not None]
                which = (f"lock {core.quote(removing[0])}" if len(removing) == 1
                         else f"one of the {len(removing)} locks")
                raise api.ApiError(f"{which} changed while it was being removed (expired, removed or rewritten "
                                   "by someone else): nothing was removed; check with ringfence get locks and "
                                   "try again", "conflict") from None
            raise api.ApiError(f"nothing was changed: the NATS server refused the write ({exc})",
                               "unavailable") from None

    # --- expiry housekeeping ----------------------------------------------------------------

    def _stored_view(self) -> dict[str, core.Stored]:
        """The view's locks with their revisions, less those this service deleted already."""
        return {key: core.Stored(lock, rev) for key, lock in self.view.values.items()
                if (key, rev := self.view.revisions.get(key, 0)) not in self.expired_here}

    async def _expire_now(self) -> None:
        async with self.ctx.write_lock:
            for change in core.plan_expiry(self._stored_view(), utcnow()):
                assert change.last is not None
                self.expired_here.add((change.key, change.last))
                try:
                    seq = await kv_batch.write_one(self.ctx.js, names.LOCKS_BUCKET, self._write(change))
                except APIError as exc:
                    if exc.err_code != WRONG_LAST_SEQUENCE:
                        self.expired_here.discard((change.key, change.last))
                        raise
                    # Someone else removed or rewrote it first: their write wins, and the
                    # view catches up with it.
                    log.debug("lock %s moved on before it was expired here", change.key)
                    continue
                self.ctx.counters["locks_expired"] += 1
                log.info("%s: removed", change.message)
                warnings = await publish_change_events(self.ctx, [change.event])
                await self.outbox.published(seq, all_published=not warnings)
        # Forget deletes the view has seen (the key is gone or holds a newer revision).
        self.expired_here = {(k, rev) for k, rev in self.expired_here if self.view.revisions.get(k) == rev}

    async def _expire(self) -> None:
        """One timer: sleep until the next expiry in the view (at most TIMER_CAP), then act.
        Locks that expired while no locks service ran go as soon as the view is complete."""
        await self.view.ready.wait()
        while not self.stopping.is_set():
            try:
                self.view_changed.clear()
                await self._expire_now()
                now = utcnow()
                due = locking.next_expiry((s.lock for s in self._stored_view().values()), now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.view_changed.wait(), core.seconds_until(due, now, TIMER_CAP))
            except asyncio.CancelledError:
                raise
            except Exception:
                self.ctx.counters["expiry_errors"] += 1
                log.exception("expiring locks failed; trying again in %.0fs", RETRY_AFTER_ERROR)
                await asyncio.sleep(RETRY_AFTER_ERROR)


def _unconfirmed(exc: Exception) -> api.ApiError:
    return api.ApiError(kv_batch.unconfirmed_message(exc, "locks", "ringfence get locks"), "unavailable")


def make_adapter(_args) -> Adapter:
    return Adapter()
