"""NATS side of the audit service: its durable pull consumer feeding the writer, and search.

Each audit service has its own durable consumer (names.audit_durable of a random
instance id kept in the data dir), so two of them (on two nodes) each write the whole
log, the same bytes: files follow the stream's order and timestamps (writer.py). Search
is one endpoint in the services' queue group: one of them answers, from identical
indexes. Events are written in stream order: runtime/pull_consumer.py reads a sequence
the consumer skipped (a fetch lost with a killed process or NATS node) from the stream
before the batch after it (STREAM_POSITION, beside the log, remembers where it is).

Session recordings have their own consumer and endpoints (recording_adapter.py), started here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ringfence.contract import names
from ringfence.contract.api import SearchRequest, SearchResult
from ringfence.contract.auditlog import log_dir
from ringfence.contract.documents import strict_request
from ringfence.keyfiles import write_secret
from ringfence.runtime.pull_consumer import Delivered, PullConsumer, Settle
from ringfence.runtime.service import Call, ServiceContext, StartupError

from . import core
from .index import INDEX_FILE, IndexWriteError, SearchIndex
from .logfiles import daily_path, disk_use
from .recording_adapter import RecordingConsumer
from .writer import AuditWriter, BatchOutcome, Incoming

log = logging.getLogger(__name__)

MAX_FETCH = 1024  # messages per fetch (one-event messages): one fsync and one index transaction each
TARGET_EVENTS = 8192  # events per write when messages are batches: fewer messages are fetched
FETCH_WAIT = 1.0  # seconds; also how often an idle writer checks for the day's rollover
ACK_WAIT = 30.0  # seconds before JetStream redelivers an unacked message (deduplicated if early)
REPLY_OVERHEAD = 4096  # bytes of a search reply that are not event lines
REPLY_MAX_BYTES = 1 << 20  # keep replies small even where NATS allows more; next_key pages on
DISK_USE_EVERY = 30.0  # seconds between measurements of the log's disk use

COUNTERS = ("written", "duplicates_skipped", "rejected", "write_errors", "gaps_filled", "retention_files_removed",
            "housekeeping_errors")
GAUGES = ("log_bytes", "index_bytes", "recordings_bytes")
STREAM_POSITION = "stream_position"  # in the log dir: the stream sequence expected next
INSTANCE_FILE = "audit_instance"  # in the data dir: names this service's durable consumers


def consumer_config(instance: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.audit_durable(instance),
        ack_policy=AckPolicy.ALL,  # one ack per batch; the writer keeps stream order
        ack_wait=ACK_WAIT,
        deliver_policy=DeliverPolicy.ALL,  # a first start writes what the stream already holds
        max_ack_pending=MAX_FETCH * 4,
        max_deliver=-1,  # never give up on an event
    )


def instance_id(data_dir: str | Path) -> str:
    """This audit service's random id (created once, 0600): its consumers' names."""
    path = Path(data_dir) / INSTANCE_FILE
    try:
        write_secret(path, secrets.token_hex(8) + "\n")
    except FileExistsError:  # the usual case: made by an earlier start
        pass
    return path.read_text().strip()


class Adapter:
    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None
        self.writer: AuditWriter | None = None
        self.search_index: SearchIndex | None = None
        self.consumer: PullConsumer | None = None
        self.recordings = RecordingConsumer()
        self._next_disk_use = 0.0

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        for name in COUNTERS + GAUGES:
            ctx.counters.setdefault(name, 0)
        directory = log_dir(ctx.config.data_dir)
        try:
            self.writer = await asyncio.to_thread(AuditWriter, directory,
                                                  retention_seconds=ctx.config.audit.retention_seconds)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        await asyncio.to_thread(self.writer.start)
        instance = await asyncio.to_thread(instance_id, ctx.config.data_dir)
        self.search_index = SearchIndex(directory / INDEX_FILE, lambda day: daily_path(directory, day))
        self.consumer = PullConsumer(ctx.js, stream=names.AUDIT_STREAM, subjects=names.AUDIT_SUBJECTS,
                                     config=consumer_config(instance), batch=MAX_FETCH, handle=self._handle,
                                     idle=self._idle, fetch_wait=FETCH_WAIT, in_order=True,
                                     position=directory / STREAM_POSITION, label="audit")
        await self.consumer.start()
        await ctx.add_endpoint("search", names.api_subject(names.AUDIT_API, "search"), self._search,
                               request=strict_request(SearchRequest), action=("event", "list"))
        await self.recordings.start(ctx, instance)

    async def _idle(self) -> None:
        await asyncio.to_thread(self._housekeeping, True)

    async def _handle(self, batch: list[Delivered]) -> Settle:
        assert self.ctx is not None and self.writer is not None and self.consumer is not None
        incoming = [Incoming(d.data, d.subject, d.stream_seq, d.stored_ms, d.headers) for d in batch]
        counters = self.ctx.counters
        counters["gaps_filled"] = self.consumer.gaps_filled
        try:
            outcome = await asyncio.to_thread(self._write, incoming)
        except Exception as exc:
            # Nothing is acked: JetStream redelivers, and the writer recovers from disk first.
            counters["write_errors"] += 1
            if isinstance(exc, (OSError, IndexWriteError)):  # e.g. disk full: the message names the file
                log.error("audit: cannot write a batch of %d messages (%s); none of it is acked, retrying",
                          len(batch), exc)
            else:
                log.exception("audit: writing a batch of %d messages failed; it will be redelivered", len(batch))
            return Settle.failed(batch)
        counters["written"] += outcome.written
        counters["duplicates_skipped"] += outcome.duplicates_skipped
        counters["rejected"] += outcome.rejected
        events = outcome.written + outcome.duplicates_skipped + outcome.rejected
        # Batch messages carry up to ~2,000 events: ask for fewer of them per fetch.
        self.consumer.batch = max(1, min(MAX_FETCH, TARGET_EVENTS * len(batch) // max(1, events)))
        return Settle.all_of(batch)

    def _write(self, incoming: list[Incoming]) -> BatchOutcome:
        """In a worker thread: the batch, then what is due (one thread hop per batch)."""
        assert self.writer is not None
        outcome = self.writer.write_batch(incoming)
        self._housekeeping(False)
        return outcome

    def _housekeeping(self, idle: bool) -> None:
        """In the writer's thread: midnight rollover when idle, retention, disk use. Never raises:
        a batch already written must be acked whatever happens here."""
        assert self.ctx is not None and self.writer is not None
        counters = self.ctx.counters
        try:
            if idle:
                self.writer.tick()
            removed = self.writer.retention_step()
            counters["retention_files_removed"] += len(removed.files_removed)
            if time.monotonic() >= self._next_disk_use:
                self._next_disk_use = time.monotonic() + DISK_USE_EVERY
                use = disk_use(self.writer.directory, self.recordings.directory)
                counters.update(log_bytes=use.log, index_bytes=use.index, recordings_bytes=use.recordings)
        except Exception:  # e.g. cannot create the new day's file; tried again at the next batch or idle
            counters["housekeeping_errors"] += 1
            log.exception("audit: rolling over, removing old days or measuring disk use failed")

    async def _search(self, call: Call[SearchRequest]) -> SearchResult:
        assert self.ctx is not None and self.search_index is not None
        query = core.validate_search(call.body)
        rows = await asyncio.to_thread(self.search_index.search, query)
        budget = min(self.ctx.nc.max_payload, REPLY_MAX_BYTES) - REPLY_OVERHEAD
        lines, next_key = core.take_page(rows, query.limit, budget)
        return SearchResult(events=[msgspec.Raw(line) for line in lines], next_key=next_key)

    async def stop(self) -> None:
        try:
            await self.recordings.stop()
        except Exception:  # the audit log below must still be closed cleanly
            log.exception("audit: stopping the recording consumer failed")
        if self.consumer is not None:
            # Lets the current batch finish (and be acked) rather than cut it off.
            await self.consumer.stop()
            if not self.consumer.stopped_cleanly:
                return  # a write may still be running in its thread: leave the files to the next start
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        if self.search_index is not None:
            self.search_index.close()


def make_adapter(_args) -> Adapter:
    return Adapter()
