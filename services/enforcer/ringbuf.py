"""Draining pinned BPF ring buffers on a thread, a round at a time.

The programs submit records without waking the reader (RB_FLAGS in
bpf/ringfence.h): a wakeup per record cost a session ~50% more time per exec,
and a flood then comes out in large batches. So the reader sleeps `poll_ms`,
drains every ring, and hands each ring's records to its callback as one list
of detached records (parsed with the wall-clock offset of that round).
"""

from __future__ import annotations

import ctypes as ct
import logging
import threading
from collections.abc import Callable
from typing import Any

from .records import boot_offset

log = logging.getLogger(__name__)

# Milliseconds between rounds. Every round has a fixed cost (in this thread, the spool, the
# event loop it wakes and the audit writer's batch): at 10 ms the rounds of a busy recorded
# session cost the enforcer and the audit service about twice the CPU they cost at 50 ms, so
# the recording reader waits 50 ms (a 4 MiB ring holds ~40,000 records: 800,000 a second).
# The network reader keeps 10 ms: a burst of denials at a million a second would fill its
# ring within 50 ms.
POLL_MS = 10

# (ring buffer table name, parse(raw, offset) -> record, deliver(records), what for the log)
Ring = tuple[bytes, Callable[[bytes, float], Any], Callable[[list[Any]], None], str]


class RingReader:
    def __init__(self, name: str, poll_ms: int = POLL_MS) -> None:
        self.name = name
        self.poll_ms = poll_ms
        self.cycles = 0  # completed rounds: everything written before a round began was handled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, bpf, rings: list[Ring], between_rounds: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Open `rings` on `bpf` (a bcc BPF object) and read them until stop().
        `between_rounds(drain)`, if given, runs after every round (drain() reads the rings
        once more, for work that must follow what they hold). The first round runs in the
        caller's thread, before this returns; the others on the reader thread."""
        if self._thread:
            raise RuntimeError(f"{self.name}: the ring buffers are read already")
        pending: list[list[bytes]] = []
        for table, _parse, _deliver, _what in rings:
            raw: list[bytes] = []
            pending.append(raw)
            bpf[table].open_ring_buffer(_collector(raw))

        def drain() -> None:
            bpf.ring_buffer_consume()
            offset = boot_offset()
            for (_table, parse, deliver, what), raw in zip(rings, pending, strict=True):
                if not raw:
                    continue
                records = [parse(r, offset) for r in raw]
                raw.clear()
                try:
                    deliver(records)
                except Exception:
                    log.exception("handling %d %s records failed", len(records), what)

        def round_() -> None:
            drain()
            if between_rounds is not None:
                try:
                    between_rounds(drain)
                except Exception:
                    log.exception("%s: the work between reading rounds failed", self.name)

        def loop() -> None:
            while not self._stop.is_set():
                bpf.ring_buffer_poll(self.poll_ms)
                round_()
                self.cycles += 1
            round_()

        # The first round runs before start() returns: what the pinned rings kept from an
        # earlier reader is handed over, and between_rounds has run once (fold maps active).
        round_()
        self.cycles += 1
        self._stop.clear()
        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join(5)
            self._thread = None


def _collector(raw: list[bytes]):
    """A ring-buffer callback that copies each record into `raw`."""

    def callback(_ctx, data, size):
        raw.append(ct.string_at(data, size))
        return 0

    return callback
