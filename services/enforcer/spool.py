"""The enforcer's outbox: events go to a local append-only file first, then to JetStream.

Writers (the ring-buffer thread, the event loop) append one JSON line per event
and return at once; the write lands in the page cache, so it survives the
enforcer being killed, and a periodic fsync bounds what a host crash can take.
A publisher drains the file in order, waits for each batch's JetStream acks,
then advances a cursor kept next to it. Events accepted while NATS is down or
the enforcer restarts are delivered afterwards, in order. A line published
twice (crash between ack and cursor write) carries the same event uid, which
the stream's duplicate window and the audit writer both drop.

A line the stream will never take (longer than MAX_LINE, or refused by the
server for good: over the stream's message size, say) is moved aside to
`rejected.jsonl` next to the spool, counted (`rejected`) and logged, and the
lines after it go on: one bad line never holds back every later event.
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

BATCH = 2048  # lines per publish round (the publisher may cut them into several messages)
FSYNC_INTERVAL = 0.2
# After a wake-up the publisher waits this long for more lines: a session's events come
# in bursts (a reader round every few ms), and every publish costs the enforcer, the
# stream and the audit writer a fixed amount however few lines it carries.
LINGER = 0.05
COMPACT_AT = 8 * 1024 * 1024  # truncate the file once fully delivered and this big
MAX_LINE = 1024 * 1024 - 4096  # the stream's message limit, less room for headers
READ_CHUNK = 1 << 20

Publish = Callable[[list[bytes]], Awaitable[None]]
# Whether a publish failure is final for what was sent (the server refuses it for good).
Permanent = Callable[[Exception], bool]


def never(_exc: Exception) -> bool:
    return False


class Spool:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "events.jsonl"
        self.cursor_path = directory / "cursor"
        self.rejected_path = directory / "rejected.jsonl"
        self.rejected = 0
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
        self.append_many([line])

    def append_many(self, lines: list[bytes]) -> None:
        """Several lines with one write (a batch of kernel records); thread-safe."""
        if any(b"\n" in line for line in lines):
            raise ValueError("spool lines must not contain newlines")
        data = b"".join(line + b"\n" for line in lines)
        with self._lock:
            self._file.write(data)
            self._file.flush()
            self._dirty = True
            self.appended += len(lines)
        if self._loop and self._wake:
            self._loop.call_soon_threadsafe(self._wake.set)

    def pending_bytes(self) -> int:
        return self.path.stat().st_size - self.cursor

    def age(self) -> float:
        """Seconds the oldest undelivered line may have waited (0 when nothing waits)."""
        return time.monotonic() - self.drained_at if self.pending_bytes() > 0 else 0.0

    def _read_batch(self) -> tuple[list[bytes], int]:
        """Up to BATCH complete lines from the cursor, and the offset after them.
        A line over MAX_LINE is never sent: when it comes first it is moved aside
        here (and the offset passes it), otherwise the batch ends before it."""
        lines: list[bytes] = []
        with open(self.path, "rb") as f:
            f.seek(self.cursor)
            end = self.cursor
            while len(lines) < BATCH:
                line = f.readline(MAX_LINE + 1)
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    if lines:
                        break  # publish what comes before it first
                    rest = _rest_of_line(f)
                    if rest is None:
                        break  # still being written
                    line += rest
                    self._set_aside(line[:-1], f"{len(line) - 1} bytes, over the {MAX_LINE}-byte limit")
                    return [], end + len(line)
                if not line.endswith(b"\n"):
                    break  # partial line being written (or none): next round
                end += len(line)
                lines.append(line[:-1])
        return lines, end

    def _set_aside(self, line: bytes, reason: str) -> None:
        with open(self.rejected_path, "ab") as f:
            f.write(line + b"\n")
        self.rejected += 1
        log.error("spool %s: a line the stream will not take was moved to %s (%s): %r", self.path,
                  self.rejected_path, reason, line[:200])

    def _compact_if_drained(self) -> None:
        with self._lock:
            size = self.path.stat().st_size
            if self.cursor == size and size >= COMPACT_AT:
                self._file.truncate(0)
                self._file.seek(0)
                self.cursor = 0
                self._write_cursor()

    async def _publish_or_set_aside(self, publish: Publish, lines: list[bytes], permanent: Permanent) -> None:
        """Publish `lines`; when the server refuses them for good, find the lines it
        refuses (one by one) and move those aside. Raises on other failures."""
        try:
            await publish(lines)
            return
        except Exception as exc:
            if not permanent(exc):
                raise
            if len(lines) == 1:
                self._set_aside(lines[0], repr(exc))
                return
        for line in lines:  # what was already stored is dropped downstream by its uid
            try:
                await publish([line])
            except Exception as exc:
                if not permanent(exc):
                    raise
                self._set_aside(line, repr(exc))

    async def run(self, publish: Publish, stop: asyncio.Event, permanent: Permanent = never) -> None:
        """Drain forever: publish batches in order, advance the cursor on ack."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        fsync_task = asyncio.create_task(self._fsync_loop(stop))
        wake_on_stop = asyncio.create_task(self._wake_on(stop))  # an idle wait ends at stop, not 1 s later
        backoff = 0.2
        try:
            while not stop.is_set():
                lines, end = await asyncio.to_thread(self._read_batch)
                if not lines and end != self.cursor:  # only lines set aside
                    self.cursor = end
                    self._write_cursor()
                    continue
                if not lines:
                    self.drained_at = time.monotonic()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    if not stop.is_set():
                        await asyncio.sleep(LINGER)
                    continue
                try:
                    await self._publish_or_set_aside(publish, lines, permanent)
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


def _rest_of_line(f) -> bytes | None:
    """The rest of an over-long line up to and including its newline; None when the
    file ends first (the line is still being written)."""
    parts = []
    while True:
        chunk = f.readline(READ_CHUNK)
        if not chunk:
            return None
        parts.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(parts)
