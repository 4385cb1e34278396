"""NATS side of the locks service: create/lock/get/delete/unlock over the locks
bucket, and housekeeping that deletes locks once they expire.

Expiry is not what makes a lock stop: the enforcer evaluates `expires` itself
at the instant it acts (ringfence.locking). Deleting expired locks keeps the
bucket and `get locks` tidy and records a lock.deleted event (reason
"expired"). A KV watcher keeps a view of every lock, whoever wrote it; one
timer sleeps until the next expiry in that view. A full re-read at start-up
and every SWEEP_INTERVAL catches anything the watcher missed. Deletes are
conditional on the revision read, so when several locks services run, one of
them removes a given lock and records it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import uuid

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError
from nats.js.kv import KeyValue
from nats.micro.request import Request

from ringfence import locking
from ringfence.contract import api, names
from ringfence.contract import resources as r
from ringfence.runtime import kv_batch, kv_read
from ringfence.runtime.audit_outbox import Outbox
from ringfence.runtime.audit_publish import publish_change_events
from ringfence.runtime.service import ServiceContext, request_actor

from . import core

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 60.0  # full re-read of the bucket; also the longest the timer sleeps
RETRY_AFTER_ERROR = 5.0
WRONG_LAST_SEQUENCE = 10071  # JetStream: the key moved on since we read it

COUNTERS = ("locks_created", "locks_deleted", "locks_expired", "requests_rejected", "audit_publish_failures",
            "undecodable_locks", "expiry_errors")


def actor_of(req: Request) -> str:
    """The user the request acts as: its verified operator identity (see ringfence.runtime.service)."""
    return request_actor(req)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Adapter:
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.kv: KeyValue = await kv_read.open_bucket(ctx.js, names.LOCKS_BUCKET)
        # One writer at a time in this process: "created" vs "updated" and the
        # order of audit events follow the order of the writes.
        self.write_lock = asyncio.Lock()
        self.view: dict[str, core.Stored] = {}  # every stored lock, as the watcher and sweeps saw it
        self.view_changed = asyncio.Event()
        self.stopping = asyncio.Event()
        for counter in COUNTERS:
            ctx.counters.setdefault(counter, 0)
        self.outbox = Outbox(ctx, names.LOCKS_BUCKET, names.LOCKS)
        await self.outbox.start()  # events of changes a killed predecessor wrote but did not publish
        await self._sweep()  # expired while no locks service ran
        self.tasks = [asyncio.create_task(self._watch(), name="locks-watch"),
                      asyncio.create_task(self._expire(), name="locks-expire")]
        # What each request does, for the role check: (resource, verb) or a resolver.
        for verb, handler, action in (("create", self.create, self._create_actions),
                                      ("lock", self.lock, ("lock", "create")),
                                      ("get", self.get, self._get_actions),
                                      ("delete", self.delete, ("lock", "delete")),
                                      ("unlock", self.unlock, ("lock", "delete"))):
            await ctx.add_endpoint(verb, names.api_subject(names.LOCKS_API, verb), self._counted(handler),
                                   action=action)

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
        async def serve(req: Request) -> bytes:
            try:
                return await handler(req)
            except api.ApiError:
                self.ctx.counters["requests_rejected"] += 1
                raise

        return serve

    async def _create_actions(self, req: Request) -> list[tuple[str, str]]:
        """create -f: ("lock", "update") for a document replacing a stored lock, else ("lock", "create")."""
        docs, _ = core.decode_create_request(req.data)
        actions = []
        for doc in docs:
            md = doc.get("metadata") if isinstance(doc, dict) else None
            name = md.get("name") if isinstance(md, dict) else None
            exists = isinstance(name, str) and core.valid_name(name) and await self._read(name) is not None
            actions.append(("lock", "update" if exists else "create"))
        return actions

    async def _get_actions(self, req: Request) -> list[tuple[str, str]]:
        request = core.decode(req.data, api.GetRequest)
        return [("lock", "read" if request.name else "list")]

    # --- endpoints ------------------------------------------------------------------

    async def create(self, req: Request) -> bytes:
        docs, dry_run = core.decode_create_request(req.data)
        checked = core.check_documents(docs)
        async with self.write_lock:
            existing = {d.lock.metadata.name for d in checked if await self._read(d.lock.metadata.name)}
            changes = core.plan_create(checked, existing, actor_of(req), utcnow())
            problems = [] if dry_run else await self._apply(changes)
        return api.ok_reply(api.CreateResult(messages=core.create_messages(changes) + problems))

    async def lock(self, req: Request) -> bytes:
        request = core.decode(req.data, api.LockRequest)
        name = str(uuid.uuid4())
        change = core.plan_lock(request, name, actor_of(req), utcnow())
        async with self.write_lock:
            problems = await self._apply([change], create_only=True)
        return api.ok_reply(api.LockResult(name=name, message="\n".join([change.message, *problems])))

    async def get(self, req: Request) -> bytes:
        request = core.decode(req.data, api.GetRequest)
        core.check_kind(request.kind)
        now = utcnow()
        if request.name:
            stored = await self._read(request.name) if core.valid_name(request.name) else None
            found = core.get_one(request.name, stored.lock if stored else None, now)
        else:
            found = core.listing([s.lock for s in (await self._read_all()).values()], now)
        return api.ok_reply(found)

    async def delete(self, req: Request) -> bytes:
        request = core.decode(req.data, api.DeleteRequest)
        core.check_kind(request.kind)
        async with self.write_lock:
            stored = await self._read(request.name) if core.valid_name(request.name) else None
            change = core.plan_delete(request.name, stored, actor_of(req))
            problems = await self._apply([change])
        return api.ok_reply(api.DeleteResult(message="\n".join([change.message, *problems])))

    async def unlock(self, req: Request) -> bytes:
        request = core.decode(req.data, api.UnlockRequest)
        async with self.write_lock:
            changes, message = core.plan_unlock(request.target, await self._read_all(), actor_of(req), utcnow())
            problems = await self._apply(changes)
        names_removed = [c.key for c in changes]
        return api.ok_reply(api.UnlockResult(names=names_removed, message="\n".join([message, *problems])))

    # --- KV ----------------------------------------------------------------------------

    def _decode(self, key: str, value: bytes | None) -> r.Lock | None:
        try:
            return msgspec.json.decode(value or b"", type=r.Lock)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.ctx.counters["undecodable_locks"] += 1
            log.error("lock %r in KV does not decode (%s); ignoring it", key, exc)
            return None

    # Reads see every write acknowledged before them, also on a cluster (runtime/kv_read.py).
    async def _read(self, key: str) -> core.Stored | None:
        try:
            entry = await kv_read.get(self.kv, key)
        except kv_read.StaleSnapshotError as exc:
            raise api.ApiError(f"cannot read the locks bucket: {exc}", "unavailable") from None
        if entry is None:
            return None
        lock = self._decode(key, entry.value)
        return core.Stored(lock, entry.revision) if lock else None

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

    def _see(self, key: str, stored: core.Stored | None, revision: int) -> None:
        """Fold one observation into the view, never going back to an older revision."""
        current = self.view.get(key)
        if current is not None and current.revision > revision:
            return
        if stored is None:
            self.view.pop(key, None)
        else:
            self.view[key] = stored
        self.view_changed.set()

    async def _watch(self) -> None:
        """Follow the bucket; restart the watcher whenever it fails."""
        while not self.stopping.is_set():
            watcher = None
            try:
                watcher = await self.kv.watch(">")
                async for entry in watcher:
                    if entry is None:
                        continue
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        self._see(entry.key, None, entry.revision or 0)
                    elif lock := self._decode(entry.key, entry.value):
                        self._see(entry.key, core.Stored(lock, entry.revision or 0), entry.revision or 0)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.ctx.counters["expiry_errors"] += 1
                log.exception("locks watcher failed; restarting it in %.0fs", RETRY_AFTER_ERROR)
                await asyncio.sleep(RETRY_AFTER_ERROR)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()

    async def _sweep(self) -> None:
        """Re-read the whole bucket into the view, then delete what has expired."""
        for key, stored in (await self._read_all()).items():
            self._see(key, stored, stored.revision)
        await self._expire_now()

    async def _expire_now(self) -> None:
        async with self.write_lock:
            for change in core.plan_expiry(dict(self.view), utcnow()):
                try:
                    seq = await kv_batch.write_one(self.ctx.js, names.LOCKS_BUCKET, self._write(change))
                except APIError as exc:
                    if exc.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    # Someone else removed or rewrote it first: their write wins and the
                    # watcher brings the view up to date.
                    log.debug("lock %s moved on before it was expired here", change.key)
                    if (current := self.view.get(change.key)) and current.revision == change.last:
                        del self.view[change.key]
                    continue
                if (current := self.view.get(change.key)) and current.revision == change.last:
                    del self.view[change.key]
                self.ctx.counters["locks_expired"] += 1
                log.info("%s: removed", change.message)
                warnings = await publish_change_events(self.ctx, [change.event])
                await self.outbox.published(seq, all_published=not warnings)

    async def _expire(self) -> None:
        """One timer: sleep until the next expiry in the view (or the next sweep), then act."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + SWEEP_INTERVAL
        while not self.stopping.is_set():
            try:
                self.view_changed.clear()
                now = utcnow()
                due = locking.next_expiry((s.lock for s in self.view.values()), now)
                delay = core.seconds_until(due, now, max(0.0, next_sweep - loop.time()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.view_changed.wait(), delay)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + SWEEP_INTERVAL
                    await self._sweep()
                else:
                    await self._expire_now()
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
