"""The enforcer's outbox: events go to a local append-only file first, then to JetStream.

Writers (the ring-buffer thread, the event loop) append one JSON line per event
and return at once; the write lands in the page cache, so it survives the
enforcer being killed, and a periodic fsync bounds what a host crash can take.
A publisher drains the file in order, waits for each batch's JetStream acks,
then advances a cursor kept next to it. Events accepted while NATS is down or
the enforcer restarts are delivered afterwards, in order. A line published
twice (crash between ack and cursor write) carries the same event uid, which
the stream's duplicate window and the audit writer both drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

BATCH = 256
FSYNC_INTERVAL = 0.2
COMPACT_AT = 8 * 1024 * 1024  # truncate the file once fully delivered and this big
MAX_LINE = 1024 * 1024

Publish = Callable[[list[bytes]], Awaitable[None]]


class Spool:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "events.jsonl"
        self.cursor_path = directory / "cursor"
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")  # noqa: SIM115 - lives as long as the spool
        self._dirty = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.cursor = self._read_cursor()
        self.delivered = 0
        self.appended = 0
        self.drained_at = time.monotonic()  # when it last held nothing undelivered

    def _read_cursor(self) -> int:
        try:
            value = int(self.cursor_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            value = 0
        size = self.path.stat().st_size
        return value if value <= size else 0  # a truncated spool restarts from its beginning

    def _write_cursor(self) -> None:
        tmp = self.cursor_path.with_suffix(".tmp")
        tmp.write_text(str(self.cursor))
        os.replace(tmp, self.cursor_path)

    def append(self, line: bytes) -> None:
        """Thread-safe; returns once the line is in the page cache."""
        if b"\n" in line:
            raise ValueError("spool lines must not contain newlines")
        with self._lock:
            self._file.write(line + b"\n")
            self._file.flush()
            self._dirty = True
            self.appended += 1
        if self._loop and self._wake:
            self._loop.call_soon_threadsafe(self._wake.set)

    def pending_bytes(self) -> int:
        return self.path.stat().st_size - self.cursor

    def age(self) -> float:
        """Seconds the oldest undelivered line may have waited (0 when nothing waits)."""
        return time.monotonic() - self.drained_at if self.pending_bytes() > 0 else 0.0

    def _read_batch(self) -> tuple[list[bytes], int]:
        lines: list[bytes] = []
        with open(self.path, "rb") as f:
            f.seek(self.cursor)
            end = self.cursor
            while len(lines) < BATCH:
                line = f.readline(MAX_LINE + 1)
                if not line.endswith(b"\n"):
                    break  # partial line being written (or none): next round
                end += len(line)
                lines.append(line[:-1])
        return lines, end

    def _compact_if_drained(self) -> None:
        with self._lock:
            size = self.path.stat().st_size
            if self.cursor == size and size >= COMPACT_AT:
                self._file.truncate(0)
                self._file.seek(0)
                self.cursor = 0
                self._write_cursor()

    async def run(self, publish: Publish, stop: asyncio.Event) -> None:
        """Drain forever: publish batches in order, advance the cursor on ack."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        fsync_task = asyncio.create_task(self._fsync_loop(stop))
        wake_on_stop = asyncio.create_task(self._wake_on(stop))  # an idle wait ends at stop, not 1 s later
        backoff = 0.2
        try:
            while not stop.is_set():
                lines, end = await asyncio.to_thread(self._read_batch)
                if not lines:
                    self.drained_at = time.monotonic()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                try:
                    await publish(lines)
                except Exception as exc:  # NATS down or slow: keep the events, retry
                    log.warning("cannot deliver %d spooled lines yet (%r); retrying in %.1fs",
                                len(lines), exc, backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
                self.cursor = end
                self.delivered += len(lines)
                self._write_cursor()
                self._compact_if_drained()
        finally:
            for task in (fsync_task, wake_on_stop):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.sync()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _fsync_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(FSYNC_INTERVAL)
            if self._dirty:
                await asyncio.to_thread(self.sync)

    def sync(self) -> None:
        with self._lock:
            self._dirty = False
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self.sync()
        self._file.close()
