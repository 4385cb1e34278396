"""Audit events that travel with the changes they record, so that none is lost.

The policy and locks services publish a change's audit event after the KV write
that makes the change. A service killed between the two would leave a change
without its event. So every KV message a change writes carries that change's
event (EVENT_HEADER, in the same atomic publish), and each service keeps, in the
AUDIT_CURSOR_BUCKET under its own name, the bucket's stream sequence up to which
every carried event is known to be published. At start, and again while a
publish has failed, the events carried by messages past the cursor are published
once more. That is safe: the event uid is the message id, so a copy the audit
stream already holds is dropped there (within its duplicate window) or by the
audit writer (by uid).

One writer per bucket is the supported shape: with two policy services, one
can move the cursor past a write of the other that is still publishing.
"""

from __future__ import annotations

import asyncio
import base64
import logging

from nats.js.errors import NotFoundError

from ..contract import names
from ..contract.events import AuditEvent, encode_event
from . import kv_read
from .audit_publish import publish_encoded, stamp
from .kv_batch import EVENT_HEADER
from .service import ServiceContext

log = logging.getLogger(__name__)

RETRY_INTERVAL = 5.0  # seconds between attempts to publish what a failed request left
PUBLISH_CHUNK = 256


def carried_event(headers: dict | None) -> bytes | None:
    """The encoded event a KV message carries, if any."""
    value = (headers or {}).get(EVENT_HEADER)
    return base64.b64decode(value) if value else None


class Outbox:
    """The audit side of one service's writes to `bucket` (see the module docstring)."""

    def __init__(self, ctx: ServiceContext, bucket: str, owner: str) -> None:
        self.ctx = ctx
        self.bucket = bucket
        self.owner = owner  # the cursor's key
        self.cursor = 0
        self._cursor_read = False  # until it is, nothing is published from 0 and the cursor stays
        self._cursor_lock = asyncio.Lock()
        self._retry: asyncio.Task | None = None
        self._failed_meanwhile = False  # a publish failed while a retry was under way
        ctx.counters.setdefault("audit_events_republished", 0)

    async def start(self) -> None:
        """Read the cursor and publish what a previous run left unpublished."""
        self.cursors = await kv_read.open_bucket(self.ctx.js, names.AUDIT_CURSOR_BUCKET)
        try:
            recovered = await self.recover()
        except Exception as exc:  # NATS busy or electing: keep trying, do not hold up the start
            log.warning("cannot publish the %s audit events left unpublished yet (%r); retrying in %.0fs",
                        self.owner, exc, RETRY_INTERVAL)
            self._retry = asyncio.create_task(self._retry_until_published(), name=f"{self.owner}-outbox")
            return
        if recovered:
            log.warning("published %d audit event(s) of %s changes written before the last stop",
                        recovered, self.owner)

    async def stop(self) -> None:
        if self._retry:
            self._retry.cancel()

    def header(self, event: AuditEvent) -> str:
        """The EVENT_HEADER value for the message that makes the change `event` records."""
        return base64.b64encode(encode_event(stamp(event, self.ctx))).decode()

    async def published(self, seq: int, all_published: bool) -> None:
        """A request's writes, up to stream sequence `seq`, are done and their events were
        published (`all_published`) or not all of them (then they are retried until they are)."""
        if not all_published:
            self._failed_meanwhile = True
            if self._retry is None:
                self._retry = asyncio.create_task(self._retry_until_published(), name=f"{self.owner}-outbox")
        elif self._retry is None:  # else the retry moves the cursor when it is through
            await self._advance(seq)

    async def recover(self) -> int:
        """Publish the events carried by the messages after the cursor; returns how many."""
        if not self._cursor_read:
            entry = await kv_read.get(self.cursors, self.owner)
            self.cursor = int(entry.value) if entry is not None and entry.value else 0
            self._cursor_read = True
        stream, subject = f"KV_{self.bucket}", f"$KV.{self.bucket}.>"
        lines: list[bytes] = []
        last = seq = self.cursor
        while True:
            try:
                msg = await self.ctx.js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                break
            seq = msg.seq or seq + 1
            event = carried_event(msg.headers)
            if event is not None:
                lines.append(event)
            last = seq
        for start in range(0, len(lines), PUBLISH_CHUNK):
            await publish_encoded(self.ctx.js, lines[start : start + PUBLISH_CHUNK])
        self.ctx.counters["audit_events_republished"] += len(lines)
        await self._advance(last)
        return len(lines)

    async def _retry_until_published(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            self._failed_meanwhile = False
            try:
                n = await self.recover()
            except Exception as exc:
                log.warning("audit events of %s changes still not published (%r); retrying in %.0fs",
                            self.owner, exc, RETRY_INTERVAL)
                continue
            if self._failed_meanwhile:  # a write after the scan may not have been covered
                continue
            log.info("published %d audit event(s) of %s changes that had failed to publish", n, self.owner)
            self._retry = None
            return

    async def _advance(self, seq: int) -> None:
        async with self._cursor_lock:
            if seq <= self.cursor:
                return
            try:
                await self.cursors.put(self.owner, str(seq).encode())
            except Exception as exc:  # the events are out; the next start publishes them again (deduplicated)
                log.warning("cannot store the %s audit cursor (%r)", self.owner, exc)
                return
            self.cursor = seq
