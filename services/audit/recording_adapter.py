"""NATS side of session recordings: the second durable pull consumer (chunks to .cast
files) and the `recordings` / `recording` endpoints. The audit Adapter starts it."""

from __future__ import annotations

import asyncio
import logging

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.micro.request import Request

from ringfence.contract import names
from ringfence.contract.api import ApiError, ok_reply
from ringfence.contract.recording import (
    RecordingGetRequest,
    RecordingGetResult,
    RecordingListRequest,
    RecordingListResult,
)
from ringfence.contract.strict import DecodeError, decode_json
from ringfence.runtime.service import ServiceContext, StartupError

from . import recording_core
from .recordings import ChunkIn, Outcome, RecordingReader, RecordingStore, recordings_dir

log = logging.getLogger(__name__)

BATCH = 64  # chunks are up to 256 KiB each
FETCH_WAIT = 1.0  # seconds; also how often held gaps are checked when nothing arrives
ACK_WAIT = 30.0  # > recording_core.GAP_WAIT: held chunks are settled before they would be redelivered
RETRY_PAUSE = 1.0
NAK_DELAY = 1.0  # a chunk beyond the hold limit comes back after this
REPLY_OVERHEAD = 4096
REPLY_MAX_BYTES = 1 << 20

COUNTERS = (
    "recording_chunks_written",
    "recording_duplicates_skipped",
    "recording_rejected",
    "recording_gaps_skipped",
    "recording_write_errors",
)
GAUGES = ("recording_chunks_held",)


def recording_consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.RECORDINGS_DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT,
        deliver_policy=DeliverPolicy.ALL,
        max_ack_pending=4096,  # room for held chunks (HOLD_MAX_CHUNKS per sid) and a batch
        max_deliver=-1,
    )


async def _settle(msgs, how: str) -> None:
    for m in msgs:
        if m is None:
            continue
        try:
            await (m.ack() if how == "ack" else m.nak(delay=NAK_DELAY))
        except Exception as exc:  # already settled, or the connection is gone: redelivery covers it
            log.debug("recordings: %s of a message failed: %s", how, exc)


class RecordingConsumer:
    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None
        self.store: RecordingStore | None = None
        self.reader: RecordingReader | None = None
        self._sub = None
        self._task: asyncio.Task | None = None
        self._fetch: asyncio.Future | None = None
        self._stopping = asyncio.Event()

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        for name in COUNTERS + GAUGES:
            ctx.counters.setdefault(name, 0)
        directory = recordings_dir(ctx.config.data_dir)
        try:
            self.store = await asyncio.to_thread(RecordingStore, directory)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        await asyncio.to_thread(self.store.start)
        self.reader = RecordingReader(directory)
        await self._subscribe()
        await ctx.add_endpoint("recordings", names.api_subject(names.AUDIT_API, "recordings"), self._list,
                               action=("session", "list"))
        await ctx.add_endpoint("recording", names.api_subject(names.AUDIT_API, "recording"), self._get,
                               action=("session", "read"))
        self._task = asyncio.create_task(self._consume(), name="recording-consumer")

    async def _subscribe(self) -> None:
        """Bind the pull consumer; a binding being replaced is released first: its leftover
        status messages would otherwise sit unread and hold up draining the connection."""
        assert self.ctx is not None
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # already gone with the connection
                log.debug("recordings: releasing the old pull subscription: %s", exc)
        self._sub = await self.ctx.js.pull_subscribe(
            names.RECORDING_SUBJECTS,
            durable=names.RECORDINGS_DURABLE,
            stream=names.RECORDINGS_STREAM,
            config=recording_consumer_config(),
        )

    async def _consume(self) -> None:
        assert self.store is not None
        while not self._stopping.is_set():
            self._fetch = asyncio.ensure_future(self._sub.fetch(BATCH, timeout=FETCH_WAIT))
            try:
                msgs = await self._fetch
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                raise
            except TimeoutError:  # nats' FetchTimeoutError, or a bare asyncio one from inside fetch
                await self._run(lambda: self.store.tick(), [])
                continue
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.warning("recordings: fetching chunks failed (%r); retrying", exc)
                await asyncio.sleep(RETRY_PAUSE)
                try:
                    await self._subscribe()
                except Exception as sub_exc:
                    log.warning("recordings: re-binding consumer %s failed (%r)", names.RECORDINGS_DURABLE, sub_exc)
                continue
            batch = [ChunkIn(m.data, m.subject, _stream_seq(m), m) for m in msgs]
            await self._run(lambda b=batch: self.store.write_batch(b), msgs)

    async def _run(self, work, msgs) -> None:
        assert self.ctx is not None and self.store is not None
        counters = self.ctx.counters
        try:
            outcome: Outcome = await asyncio.to_thread(work)
        except Exception:
            # Nothing of this batch (nor what was held) is acked: redelivered, after recovery from disk.
            counters["recording_write_errors"] += 1
            log.exception("recordings: writing a batch of %d chunks failed; it will be redelivered", len(msgs))
            await _settle(list(msgs) + self.store.fail(), "nak")
            await asyncio.sleep(RETRY_PAUSE)
            return
        counters["recording_chunks_written"] += outcome.written
        counters["recording_duplicates_skipped"] += outcome.duplicates_skipped
        counters["recording_rejected"] += outcome.rejected
        counters["recording_gaps_skipped"] += outcome.gaps_skipped
        counters["recording_chunks_held"] = outcome.held  # a gauge: chunks waiting for a gap to fill
        await _settle(outcome.ack, "ack")
        await _settle(outcome.nak, "nak")

    # --- endpoints ----------------------------------------------------------------------------

    async def _list(self, req: Request) -> bytes:
        assert self.reader is not None
        try:
            request = decode_json(req.data or b"{}", RecordingListRequest)
        except DecodeError as exc:
            raise ApiError(str(exc)) from None
        recording_core.validate_list(request)
        found = await asyncio.to_thread(self.reader.list, request.user, request.limit)
        return ok_reply(RecordingListResult(recordings=found))

    async def _get(self, req: Request) -> bytes:
        assert self.ctx is not None and self.reader is not None
        try:
            request = decode_json(req.data or b"{}", RecordingGetRequest)
        except DecodeError as exc:
            raise ApiError(str(exc)) from None
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
        self._stopping.set()
        if self._fetch is not None:
            self._fetch.cancel()
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=FETCH_WAIT + 10)
            if not done:
                self._task.cancel()
                return  # a write may still be running in its thread: the next start recovers
            if not self._task.cancelled() and self._task.exception():
                log.error("recording consumer ended with %r", self._task.exception())
        if self.store is not None:
            # Held chunks come back at once to whoever runs next, not after ack_wait.
            await _settle(self.store.drop_held(), "nak")
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("recordings: unsubscribing the pull consumer: %s", exc)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self.reader is not None:
            self.reader.close()


def _stream_seq(msg) -> int:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # not a JetStream message
        return 0
