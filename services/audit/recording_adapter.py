"""NATS side of session recordings: the second durable pull consumer (chunks to .cast
files) and the `recordings` / `recording` endpoints. The audit Adapter starts it."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ringfence.contract import names
from ringfence.contract.api import ApiError, ok_reply
from ringfence.contract.documents import strict_request
from ringfence.contract.recording import (
    RecordingGetRequest,
    RecordingGetResult,
    RecordingListRequest,
    RecordingListResult,
)
from ringfence.runtime.pull_consumer import Delivered, PullConsumer, Settle
from ringfence.runtime.service import Call, ServiceContext, StartupError

from . import recording_core
from .recordings import ChunkIn, Outcome, RecordingReader, RecordingStore, recordings_dir

log = logging.getLogger(__name__)

BATCH = 64  # chunks are up to 256 KiB each
FETCH_WAIT = 1.0  # seconds; also how often held gaps are checked when nothing arrives
ACK_WAIT = 30.0  # > recording_core.GAP_WAIT: held chunks are settled before they would be redelivered
REPLY_OVERHEAD = 4096
REPLY_MAX_BYTES = 1 << 20
RETENTION_CHECK = 60.0  # seconds between looks for recordings older than the retention

COUNTERS = (
    "recording_chunks_written",
    "recording_duplicates_skipped",
    "recording_rejected",
    "recording_gaps_skipped",
    "recording_write_errors",
    "recordings_removed",
    "recording_retention_errors",
)
GAUGES = ("recording_chunks_held",)


def recording_consumer_config(instance: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.recordings_durable(instance),
        ack_policy=AckPolicy.EXPLICIT,  # held chunks are acked later than chunks after them
        ack_wait=ACK_WAIT,
        deliver_policy=DeliverPolicy.ALL,
        max_ack_pending=4096,  # room for held chunks (HOLD_MAX_CHUNKS per sid) and a batch
        max_deliver=-1,
    )


class RecordingConsumer:
    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None
        self.store: RecordingStore | None = None
        self.reader: RecordingReader | None = None
        self.consumer: PullConsumer | None = None
        self.directory: Path | None = None
        self._next_retention = 0.0

    async def start(self, ctx: ServiceContext, instance: str) -> None:
        self.ctx = ctx
        for name in COUNTERS + GAUGES:
            ctx.counters.setdefault(name, 0)
        self.directory = directory = recordings_dir(ctx.config.data_dir)
        try:
            self.store = await asyncio.to_thread(RecordingStore, directory)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        await asyncio.to_thread(self.store.start)
        self.reader = RecordingReader(directory)
        self.consumer = PullConsumer(ctx.js, stream=names.RECORDINGS_STREAM, subjects=names.RECORDING_SUBJECTS,
                                     config=recording_consumer_config(instance), batch=BATCH, handle=self._handle,
                                     idle=self._idle, fetch_wait=FETCH_WAIT, label="recordings")
        await self.consumer.start()
        await ctx.add_endpoint("recordings", names.api_subject(names.AUDIT_API, "recordings"), self._list,
                               request=strict_request(RecordingListRequest), action=("session", "list"))
        await ctx.add_endpoint("recording", names.api_subject(names.AUDIT_API, "recording"), self._get,
                               request=strict_request(RecordingGetRequest), action=("session", "read"))

    async def _handle(self, batch: list[Delivered]) -> Settle:
        assert self.store is not None
        chunks = [ChunkIn(d.data, d.subject, d.stream_seq, d.msg) for d in batch]
        return await self._run(lambda: self.store.write_batch(chunks), batch)

    async def _idle(self) -> Settle:
        assert self.store is not None
        settle = await self._run(lambda: self.store.tick(), [])
        await self._retention()
        return settle

    async def _run(self, work, batch: list[Delivered]) -> Settle:
        assert self.ctx is not None and self.store is not None
        counters = self.ctx.counters
        try:
            outcome: Outcome = await asyncio.to_thread(work)
        except Exception:
            # Nothing of this batch (nor what was held) is acked: redelivered, after recovery from disk.
            counters["recording_write_errors"] += 1
            log.exception("recordings: writing a batch of %d chunks failed; it will be redelivered", len(batch))
            failed = Settle.failed(batch)
            failed.nak += self.store.fail()
            return failed
        counters["recording_chunks_written"] += outcome.written
        counters["recording_duplicates_skipped"] += outcome.duplicates_skipped
        counters["recording_rejected"] += outcome.rejected
        counters["recording_gaps_skipped"] += outcome.gaps_skipped
        counters["recording_chunks_held"] = outcome.held  # a gauge: chunks waiting for a gap to fill
        return Settle(ack=[t for t in outcome.ack if t is not None], nak=[t for t in outcome.nak if t is not None])

    async def _retention(self) -> None:
        """Remove recordings whose last output is older than audit.retention (checked once a minute)."""
        assert self.ctx is not None and self.store is not None
        seconds = self.ctx.config.audit.retention_seconds
        if seconds <= 0 or time.monotonic() < self._next_retention:
            return
        self._next_retention = time.monotonic() + RETENTION_CHECK
        try:
            removed = await asyncio.to_thread(self.store.remove_older_than, (time.time() - seconds) * 1000)
        except Exception:
            self.ctx.counters["recording_retention_errors"] += 1
            log.exception("recordings: removing recordings older than the retention failed")
            return
        self.ctx.counters["recordings_removed"] += len(removed)

    # --- endpoints ----------------------------------------------------------------------------

    async def _list(self, call: Call[RecordingListRequest]) -> RecordingListResult:
        assert self.reader is not None
        request = call.body
        recording_core.validate_list(request)
        found = await asyncio.to_thread(self.reader.list, request.user, request.limit)
        return RecordingListResult(recordings=found)

    async def _get(self, call: Call[RecordingGetRequest]):
        assert self.ctx is not None and self.reader is not None
        request = call.body
        recording_core.validate_get(request)
        rec = await asyncio.to_thread(self.reader.get, request.sid)
        if rec is None:
            raise ApiError(f'no recording of session "{request.sid}"', "not_found")
        if request.offset > rec.bytes:
            raise ApiError(f"offset: {request.offset} is past the end of the recording ({rec.bytes} bytes)")
        # The text goes into a JSON string: escaping at most doubles it (each \ and " of the .cast).
        budget = (min(self.ctx.nc.max_payload, REPLY_MAX_BYTES) - REPLY_OVERHEAD) // 2
        limit = max(4, min(request.limit, budget))  # at least one whole UTF-8 character per page
        raw = await asyncio.to_thread(self.reader.read, rec, request.offset, limit)
        page = recording_core.cut_page(raw, at_end=request.offset + len(raw) >= rec.bytes)
        next_offset = request.offset + len(page)
        return ok_reply(
            RecordingGetResult(
                data=page.decode("utf-8", errors="replace"),
                next_offset=next_offset,
                complete=bool(rec.ended) and next_offset >= rec.bytes,
            )
        )

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            if not self.consumer.stopped_cleanly:
                return  # a write may still be running in its thread: the next start recovers
            if self.store is not None:
                # Held chunks come back at once to whoever runs next, not after ack_wait.
                await self.consumer.settle(Settle(nak=[t for t in self.store.drop_held() if t is not None]))
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self.reader is not None:
            self.reader.close()
