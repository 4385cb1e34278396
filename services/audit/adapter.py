"""NATS side of the audit service: the durable pull consumer feeding the writer, and search.

Events are written in stream order. The consumer counts a message handed to a
fetch as delivered even when the fetch never arrives (this service killed while
holding it, or the NATS node its connection went through dying with it in
flight); JetStream resends such a message only after ack_wait, after newer ones.
So the service keeps the stream sequence it expects next (STREAM_POSITION, beside
the log) and reads any sequence a batch skips straight from the stream, from its
leader, before writing the batch; the late redelivery is then a duplicate.

Session recordings have their own consumer and endpoints (recording_adapter.py), started here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.micro.request import Request

from ringfence.contract import names
from ringfence.contract.api import ApiError, SearchRequest, SearchResult, ok_reply
from ringfence.contract.auditlog import log_dir
from ringfence.contract.batches import BatchError, events_in
from ringfence.contract.strict import DecodeError, decode_json
from ringfence.runtime.service import ServiceContext, StartupError

from . import core
from .index import INDEX_FILE, IndexWriteError, SearchIndex
from .recording_adapter import RecordingConsumer
from .writer import AuditWriter, Incoming

log = logging.getLogger(__name__)

BATCH = 256  # messages per fetch: one fsync and one index transaction each
FETCH_WAIT = 1.0  # seconds; also how often an idle writer checks for the day's rollover
ACK_WAIT = 30.0  # seconds before JetStream redelivers an unacked message (deduplicated if early)
RETRY_PAUSE = 1.0
REPLY_OVERHEAD = 4096  # bytes of a search reply that are not event lines
REPLY_MAX_BYTES = 1 << 20  # keep replies small even where NATS allows more; next_key pages on

COUNTERS = ("written", "duplicates_skipped", "rejected", "write_errors", "gaps_filled")
STREAM_POSITION = "stream_position"  # in the log dir: the stream sequence expected next
MAX_GAP = 10_000  # messages read from the stream to fill one gap; a wider one is left to redelivery


def consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.AUDIT_DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT,
        deliver_policy=DeliverPolicy.ALL,  # a first start writes what the stream already holds
        max_ack_pending=BATCH * 4,
        max_deliver=-1,  # never give up on an event
    )


class Adapter:
    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None
        self.writer: AuditWriter | None = None
        self.search_index: SearchIndex | None = None
        self._sub = None
        self._task: asyncio.Task | None = None
        self._fetch: asyncio.Future | None = None
        self._stopping = asyncio.Event()
        self.recordings = RecordingConsumer()
        self._position_path: Path | None = None
        self.position: int | None = None  # stream sequence expected next; None: not known

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        for name in COUNTERS:
            ctx.counters.setdefault(name, 0)
        directory = log_dir(ctx.config.data_dir)
        try:
            self.writer = await asyncio.to_thread(AuditWriter, directory)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        await asyncio.to_thread(self.writer.start)
        self._position_path = directory / STREAM_POSITION
        self.position = _read_position(self._position_path)
        self.search_index = SearchIndex(directory / INDEX_FILE)
        await self._subscribe()
        await ctx.add_endpoint("search", names.api_subject(names.AUDIT_API, "search"), self._search,
                               action=("event", "list"))
        self._task = asyncio.create_task(self._consume(), name="audit-consumer")
        await self.recordings.start(ctx)

    async def _subscribe(self) -> None:
        """Bind the pull consumer; a binding being replaced is released first: its leftover
        status messages would otherwise sit unread and hold up draining the connection."""
        assert self.ctx is not None
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # already gone with the connection
                log.debug("audit: releasing the old pull subscription: %s", exc)
        self._sub = await self.ctx.js.pull_subscribe(
            names.AUDIT_SUBJECTS, durable=names.AUDIT_DURABLE, stream=names.AUDIT_STREAM, config=consumer_config()
        )

    async def _consume(self) -> None:
        assert self.ctx is not None and self.writer is not None
        while not self._stopping.is_set():
            self._fetch = asyncio.ensure_future(self._sub.fetch(BATCH, timeout=FETCH_WAIT))
            try:
                msgs = await self._fetch
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return  # stop() interrupted an idle wait; anything fetched is redelivered
                raise
            except TimeoutError:  # nats' FetchTimeoutError, or a bare asyncio one from inside fetch
                await self._idle()
                continue
            except Exception as exc:  # disconnected, consumer deleted, ...: retry, re-binding
                if self._stopping.is_set():
                    return
                log.warning("audit: fetching events failed (%r); retrying", exc)
                await asyncio.sleep(RETRY_PAUSE)
                try:
                    await self._subscribe()
                except Exception as sub_exc:
                    log.warning("audit: re-binding consumer %s failed (%r)", names.AUDIT_DURABLE, sub_exc)
                continue
            try:
                await self._handle(msgs)
            except Exception:  # e.g. acks lost to a disconnect: redelivery is deduplicated
                log.exception("audit: handling a batch of %d messages failed", len(msgs))

    async def _idle(self) -> None:
        assert self.writer is not None
        try:
            await asyncio.to_thread(self.writer.tick)
        except Exception:  # e.g. cannot create the new day's file; the next batch tries again
            log.exception("audit: rolling over the daily file failed")

    async def _handle(self, msgs) -> None:
        assert self.ctx is not None and self.writer is not None
        received = [i for m in msgs for i in _expand(Incoming(m.data, m.subject, _stream_seq(m)), m.headers)]
        missing = core.missing_sequences(self.position, [i.stream_seq for i in received], MAX_GAP)
        filled = await self._read_from_stream(missing) if missing else []
        # Stream order; a redelivery of something already written is dropped by uid.
        batch = sorted(filled + received, key=lambda i: i.stream_seq)
        try:
            outcome = await asyncio.to_thread(self.writer.write_batch, batch)
        except Exception as exc:
            # Nothing is acked: JetStream redelivers, and the writer recovers from disk first.
            self.ctx.counters["write_errors"] += 1
            if isinstance(exc, (OSError, IndexWriteError)):  # e.g. disk full: the message names the file
                log.error("audit: cannot write a batch of %d events (%s); none of it is acked, retrying",
                          len(batch), exc)
            else:
                log.exception("audit: writing a batch of %d events failed; it will be redelivered", len(batch))
            for m in msgs:
                await m.nak(delay=RETRY_PAUSE)
            await asyncio.sleep(RETRY_PAUSE)
            return
        counters = self.ctx.counters
        counters["written"] += outcome.written
        counters["duplicates_skipped"] += outcome.duplicates_skipped
        counters["rejected"] += outcome.rejected
        counters["gaps_filled"] += len(filled)
        newest = max((i.stream_seq for i in batch), default=0)
        if newest and (self.position is None or newest >= self.position):
            self.position = newest + 1
            await asyncio.to_thread(_write_position, self._position_path, self.position)
        for m in msgs:
            await m.ack()

    async def _read_from_stream(self, seqs: list[int]) -> list[Incoming]:
        """The messages at `seqs`, from the stream leader (a follower may not have them yet);
        a sequence the stream no longer has (expired, deleted) is skipped. Waits out a
        leader election or a reconnect; gives up (RuntimeError, nothing acked) only when stopping."""
        assert self.ctx is not None
        with contextlib.suppress(Exception):  # best effort: what the stream no longer has is skipped below anyway
            first = (await self.ctx.js.stream_info(names.AUDIT_STREAM)).state.first_seq
            seqs = [s for s in seqs if s >= first]  # expired while this service was down
            if not seqs:
                return []
        log.warning("audit: stream sequences %d..%d were skipped by the consumer (a fetch that never arrived); "
                    "reading %d from the stream to keep the log in order", seqs[0], seqs[-1], len(seqs))
        found: list[Incoming] = []
        for seq in seqs:
            while True:
                try:
                    msg = await self.ctx.js.get_msg(names.AUDIT_STREAM, seq=seq, direct=False)
                except NotFoundError:
                    log.info("audit: stream sequence %d is gone (expired or deleted); skipping it", seq)
                    break
                except Exception as exc:  # no leader yet, disconnected: the batch waits, in order
                    if self._stopping.is_set():
                        raise RuntimeError(f"stopping while reading stream sequence {seq}") from None
                    log.warning("audit: reading stream sequence %d failed (%r); retrying", seq, exc)
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                if msg.subject and msg.subject.startswith(names.AUDIT_SUBJECT_PREFIX + "."):
                    found += _expand(Incoming(msg.data or b"", msg.subject, seq), msg.headers)
                break
        return found

    async def _search(self, req: Request) -> bytes:
        assert self.ctx is not None and self.search_index is not None
        try:
            request = decode_json(req.data or b"{}", SearchRequest)
        except DecodeError as exc:
            raise ApiError(str(exc)) from None
        query = core.validate_search(request)
        rows = await asyncio.to_thread(self.search_index.search, query)
        budget = min(self.ctx.nc.max_payload, REPLY_MAX_BYTES) - REPLY_OVERHEAD
        lines, next_key = core.take_page(rows, query.limit, budget)
        return ok_reply(SearchResult(events=[msgspec.Raw(line) for line in lines], next_key=next_key))

    async def stop(self) -> None:
        try:
            await self.recordings.stop()
        except Exception:  # the audit log below must still be closed cleanly
            log.exception("audit: stopping the recording consumer failed")
        self._stopping.set()
        if self._fetch is not None:
            self._fetch.cancel()  # a no-op once fetched: a batch being written is finished and acked
        if self._task is not None:
            # Let the current batch finish (and be acked) rather than cut it off.
            done, _ = await asyncio.wait([self._task], timeout=FETCH_WAIT + 10)
            if not done:
                self._task.cancel()
                return  # a write may still be running in its thread: leave the files to the next start
            if not self._task.cancelled() and self._task.exception():
                log.error("audit consumer ended with %r", self._task.exception())
        if self._sub is not None:
            # Expired pull requests leave status messages nobody reads; draining would wait for them.
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # already gone with the connection: nothing to release
                log.debug("audit: unsubscribing the pull consumer: %s", exc)
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        if self.search_index is not None:
            self.search_index.close()


def _read_position(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_position(path: Path | None, position: int) -> None:
    """Not fsynced: a position lost to a crash is behind, and behind only costs reads of
    messages already written (dropped by uid); it is never ahead of what is written."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{position}\n")
    os.replace(tmp, path)


def _expand(msg: Incoming, headers: dict | None) -> list[Incoming]:
    """A batch message (contract/batches.py) as its events, each as if it came alone.
    Stopgap for the kernel branch until the audit service's own batch consumer lands."""
    try:
        lines = events_in(msg.subject, headers, msg.data)
    except BatchError:
        return [msg]  # written to rejected.log as what it is: not an event
    return [msg] if lines == [msg.data] else [Incoming(line, msg.subject, msg.stream_seq) for line in lines]


def _stream_seq(msg) -> int:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # not a JetStream message: no sequence to report
        return 0


def make_adapter(_args) -> Adapter:
    return Adapter()
