"""A durable JetStream pull consumer that hands batches to a handler: fetch, fill gaps, settle
(ack or nak), stop. The audit service's two consumers (events, recordings) and
`ringfence events tail --durable` use it.

Gaps (`in_order`): a consumer counts a message handed to a fetch as delivered even
when the fetch never arrives (the process killed while holding it, or the NATS node
its connection went through dying with it in flight); JetStream resends it only after
ack_wait, after newer ones. An in-order consumer remembers the stream sequence it
expects next (`position`: kept in a file when given, else taken from the consumer's
ack floor whenever it binds) and reads any sequence a batch skips straight from the
stream, from its leader, before handing the batch on; the late redelivery is then a
duplicate for the handler to drop.

Acks: with AckPolicy.ALL one ack per batch settles everything delivered before it too,
which is only safe in order: it would also settle a lost fetch's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

RETRY_PAUSE = 1.0
NAK_DELAY = 1.0
MAX_GAP = 10_000  # messages read from the stream to fill one gap; a wider one is left to redelivery


@dataclass(frozen=True)
class Delivered:
    data: bytes
    subject: str
    stream_seq: int
    stored_ms: int  # when the stream stored it (ms since the epoch)
    headers: dict[str, str] | None = None
    msg: Msg | None = None  # None: read from the stream to fill a gap (nothing to settle)


@dataclass
class Settle:
    """What the handler made of a batch: messages to ack and to deliver again, and whether
    the batch is done (the position moves past it)."""

    ack: list[Msg] = field(default_factory=list)
    nak: list[Msg] = field(default_factory=list)
    done: bool = True

    @classmethod
    def all_of(cls, batch: list[Delivered]) -> Settle:
        return cls(ack=[d.msg for d in batch if d.msg is not None])

    @classmethod
    def failed(cls, batch: list[Delivered]) -> Settle:
        return cls(nak=[d.msg for d in batch if d.msg is not None], done=False)


Handler = Callable[[list[Delivered]], Awaitable[Settle]]
Idle = Callable[[], Awaitable[Settle | None]]  # called when a fetch found nothing


def missing_sequences(expected: int | None, received: list[int], max_gap: int = MAX_GAP) -> list[int]:
    """Stream sequences to read from the stream before handing on a batch of `received` ones.

    `expected` is the sequence after the last one handled (None: unknown, e.g. a first
    start). Every sequence from `expected` up to the newest received that was not
    received is missing. A gap wider than `max_gap` is not filled (the stream was
    replaced, or the position is from another one); those messages come when JetStream
    resends them."""
    seqs = sorted({s for s in received if s > 0})
    if expected is None or not seqs or seqs[-1] < expected:
        return []
    have = set(seqs)
    missing = [s for s in range(expected, seqs[-1]) if s not in have]
    return missing if len(missing) <= max_gap else []


def delivered(msg: Msg) -> Delivered:
    try:
        meta = msg.metadata
        seq, stored_ms = meta.sequence.stream, int(meta.timestamp.timestamp() * 1000)
    except Exception:  # not a JetStream message: no sequence to report
        seq, stored_ms = 0, 0
    return Delivered(msg.data, msg.subject, seq, stored_ms, msg.headers, msg)


class PullConsumer:
    def __init__(self, js: JetStreamContext, *, stream: str, subjects: str, config: ConsumerConfig, batch: int,
                 handle: Handler, idle: Idle | None = None, fetch_wait: float = 1.0, in_order: bool = False,
                 position: Path | None = None, label: str = "") -> None:
        self.js = js
        self.stream = stream
        self.subjects = subjects
        self.config = config
        self.batch = batch
        self.handle = handle
        self.idle = idle
        self.fetch_wait = fetch_wait
        if config.ack_policy == AckPolicy.ALL and not in_order:
            raise ValueError("AckPolicy.ALL acks a lost fetch's messages too: use it with in_order=True")
        self.in_order = in_order
        self.position_path = position
        self.position = read_position(position) if position else None  # stream sequence expected next
        self.label = label or config.durable_name or stream
        self.gaps_filled = 0
        self._sub = None
        self._task: asyncio.Task | None = None
        self._fetch: asyncio.Future | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        await self._bind()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.label}")

    async def _bind(self) -> None:
        """Bind the durable consumer, creating it where it is missing: from the position when
        there is one (a new consumer for a log that has lines), else as configured."""
        config = self.config
        if self.position is not None:
            try:
                await self.js.consumer_info(self.stream, config.durable_name)
            except NotFoundError:
                last = (await self.js.stream_info(self.stream)).state.last_seq
                if self.position > last + 1:  # the stream was replaced: its sequences started again
                    log.warning("%s: the stream ends at sequence %d, before where this log stopped (%d): "
                                "it was replaced; reading all of it (what is written already is skipped)",
                                self.label, last, self.position)
                    self.position = None
                else:
                    config = dataclasses.replace(config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                                 opt_start_seq=self.position)
                    log.info("%s: creating consumer %s at stream sequence %d (where this log stopped)",
                             self.label, config.durable_name, self.position)
        if self._sub is not None:
            # A binding being replaced is released first: its leftover status messages would
            # otherwise sit unread and hold up draining the connection.
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # already gone with the connection
                log.debug("%s: releasing the old pull subscription: %s", self.label, exc)
        self._sub = await self.js.pull_subscribe(self.subjects, durable=config.durable_name, stream=self.stream,
                                                 config=config)
        if self.in_order and self.position_path is None:
            # What an earlier run (or connection) acked last: anything after it still pending
            # was handed to a fetch that may never arrive.
            floor = (await self.js.consumer_info(self.stream, config.durable_name)).ack_floor.stream_seq
            self.position = floor + 1 if floor else None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            assert self._sub is not None
            self._fetch = asyncio.ensure_future(self._sub.fetch(self.batch, timeout=self.fetch_wait))
            try:
                msgs = await self._fetch
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return  # stop() interrupted an idle wait; anything fetched is redelivered
                raise
            except TimeoutError:  # nats' and asyncio's: nothing came within fetch_wait
                if self.idle is not None and (settle := await self.idle()) is not None:
                    await self.settle(settle)
                continue
            except Exception as exc:  # disconnected, consumer deleted, ...: retry, re-binding
                if self._stopping.is_set():
                    return
                log.warning("%s: fetching failed (%r); retrying", self.label, exc)
                await asyncio.sleep(RETRY_PAUSE)
                try:
                    await self._bind()
                except Exception as bind_exc:
                    log.warning("%s: re-binding consumer %s failed (%s)", self.label, self.config.durable_name,
                                bind_exc)
                continue
            try:
                await self._deliver(msgs)
            except Exception:  # e.g. acks lost to a disconnect: redelivery is deduplicated
                log.exception("%s: handling a batch of %d messages failed", self.label, len(msgs))

    async def _deliver(self, msgs: list[Msg]) -> None:
        received = [delivered(m) for m in msgs]
        if self.in_order:
            missing = missing_sequences(self.position, [d.stream_seq for d in received])
            if missing:
                filled = await self._read_from_stream(missing)
                self.gaps_filled += len(filled)
                received = sorted(filled + received, key=lambda d: d.stream_seq)
        settle = await self.handle(received)
        if settle.done and self.in_order:
            newest = max((d.stream_seq for d in received), default=0)
            if newest and (self.position is None or newest >= self.position):
                self.position = newest + 1
                if self.position_path is not None:
                    await asyncio.to_thread(write_position, self.position_path, self.position)
        await self.settle(settle)
        if not settle.done:
            await asyncio.sleep(RETRY_PAUSE)

    async def settle(self, settle: Settle) -> None:
        acks = settle.ack
        if self.config.ack_policy == AckPolicy.ALL and acks:
            # Acks every message delivered to this consumer up to the newest.
            acks = [max(acks, key=lambda m: m.metadata.sequence.consumer)]
        for m in acks:
            await _settle(m.ack(), "ack")
        for m in settle.nak:
            await _settle(m.nak(delay=NAK_DELAY), "nak")

    async def _read_from_stream(self, seqs: list[int]) -> list[Delivered]:
        """The messages at `seqs`, from the stream leader (a follower may not have them yet);
        a sequence the stream no longer has (expired, deleted) is skipped. Waits out a
        leader election or a reconnect; gives up (RuntimeError, nothing acked) only when stopping."""
        with contextlib.suppress(Exception):  # best effort: what the stream no longer has is skipped below anyway
            first = (await self.js.stream_info(self.stream)).state.first_seq
            seqs = [s for s in seqs if s >= first]  # expired while this process was down
            if not seqs:
                return []
        log.warning("%s: stream sequences %d..%d were skipped by the consumer (a fetch that never arrived); "
                    "reading %d from the stream to keep the log in order", self.label, seqs[0], seqs[-1], len(seqs))
        prefix = self.subjects.removesuffix(">")
        found: list[Delivered] = []
        for seq in seqs:
            while True:
                try:
                    msg = await self.js.get_msg(self.stream, seq=seq, direct=False)
                except NotFoundError:
                    log.info("%s: stream sequence %d is gone (expired or deleted); skipping it", self.label, seq)
                    break
                except Exception as exc:  # no leader yet, disconnected: the batch waits, in order
                    if self._stopping.is_set():
                        raise RuntimeError(f"stopping while reading stream sequence {seq}") from None
                    log.warning("%s: reading stream sequence %d failed (%r); retrying", self.label, seq, exc)
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                if msg.subject and msg.subject.startswith(prefix):
                    stored_ms = int(msg.time.timestamp() * 1000) if msg.time else 0
                    found.append(Delivered(msg.data or b"", msg.subject, seq, stored_ms, msg.headers))
                break
        return found

    async def stop(self) -> None:
        """Finish the batch being handled (and settle it), then stop fetching."""
        self._stopping.set()
        if self._fetch is not None:
            self._fetch.cancel()  # a no-op once fetched: a batch being handled is finished and settled
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=self.fetch_wait + 10)
            if not done:
                self._task.cancel()
                return
            if not self._task.cancelled() and self._task.exception():
                log.error("%s: consumer ended with %r", self.label, self._task.exception())
        if self._sub is not None:
            # Expired pull requests leave status messages nobody reads; draining would wait for them.
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # already gone with the connection: nothing to release
                log.debug("%s: unsubscribing the pull consumer: %s", self.label, exc)

    @property
    def stopped_cleanly(self) -> bool:
        """False when stop() had to cancel a batch still being handled (its thread may still run)."""
        return self._task is None or (self._task.done() and not self._task.cancelled())


async def _settle(coro, how: str) -> None:
    try:
        await coro
    except Exception as exc:  # already settled, or the connection is gone: redelivery covers it
        log.debug("consumer: %s of a message failed: %s", how, exc)


def read_position(path: Path | None) -> int | None:
    try:
        return int(path.read_text().strip()) if path else None
    except (OSError, ValueError):
        return None


def write_position(path: Path, position: int) -> None:
    """Not fsynced: a position lost to a crash is behind, and behind only costs reads of
    messages already handled (dropped as duplicates); it is never ahead of what is handled."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{position}\n")
    os.replace(tmp, path)
