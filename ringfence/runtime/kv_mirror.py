"""A local copy of part of a KV bucket, kept current by a watch.

Each (re)start of the watch delivers every current value first, so the copy is
rebuilt from scratch whenever the watch is restarted: after a reconnect, when
the watch dies, and every RESYNC_INTERVAL. `synced_at` says when the copy was
last known to be complete and current; a strict lock view uses it.

Values are decoded into a msgspec type. One that does not decode is counted
(`counters["kv_undecodable"]`, shown by `ringfence status --stats`) and
logged, and the copy keeps what it had for that key: an enforcer keeps the
last good policy or lock rather than forgetting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client

from . import kv_read
from .kv_watch import watchable_bucket
from .stopping import unless_stopped

log = logging.getLogger(__name__)

T = TypeVar("T")
RESYNC_INTERVAL = 30.0
HEARTBEAT = 1.0
UNDECODABLE = "kv_undecodable"  # the counter of values that did not decode


class KvMirror(Generic[T]):
    def __init__(
        self,
        nc: Client,
        bucket: str,
        key_filter: str,
        type_: type[T],
        on_change: Callable[[], None] | None = None,
        counters: dict[str, int] | None = None,
    ) -> None:
        self.nc = nc
        self.bucket = bucket
        self.key_filter = key_filter
        self.decoder = msgspec.json.Decoder(type_)
        self.on_change = on_change
        self.counters = counters if counters is not None else {}
        self.counters.setdefault(UNDECODABLE, 0)
        self.values: dict[str, T] = {}
        self.revisions: dict[str, int] = {}  # the KV revision of each value held
        self.revision = 0  # the newest revision seen, a delete included (0: nothing yet)
        self.synced_at = 0.0  # monotonic; 0 = never complete
        self.ready = asyncio.Event()

    def _decoded(self, key: str, raw: bytes) -> T | None:
        try:
            return self.decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            self.counters[UNDECODABLE] += 1
            log.error("%s/%s does not decode (%s); keeping what was known for it", self.bucket, key, exc)
            return None

    def _changed(self) -> None:
        if self.on_change:
            self.on_change()

    async def run(self, stop: asyncio.Event) -> None:
        kv = await watchable_bucket(self.nc.jetstream(), self.bucket)  # deaf watches replaced within seconds
        while not stop.is_set():
            try:
                # A watch waiting out its heartbeat must not hold up the service's stop by a second.
                await unless_stopped(stop, self._watch_once(kv, stop))
            except Exception as exc:
                log.warning("watch of %s/%s stopped (%r); restarting", self.bucket, self.key_filter, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def _watch_once(self, kv: Any, stop: asyncio.Event) -> None:
        watcher = await kv.watch(self.key_filter)
        # nats-py can mark the end of the initial values (None) before it has delivered all of
        # them, also before a key rewritten meanwhile whose old value the watch skipped (see
        # runtime/kv_read.py): the fresh copy is complete once it also holds the newest message
        # under the filter, asked after the marker (and again after each catch-up).
        wanted = 0
        newest, initial_ended = 0, False
        fresh: dict[str, T] | None = {}
        fresh_revisions: dict[str, int] = {}
        started = time.monotonic()
        was_connected = True
        try:
            while not stop.is_set():
                if fresh is None:  # caught up: the copy is current while we stay connected
                    connected = self.nc.is_connected
                    if connected:
                        self.synced_at = time.monotonic()
                    elif was_connected:
                        log.warning("lost NATS; %s view may go stale", self.bucket)
                    if connected and not was_connected:
                        return  # reconnected: restart for a full snapshot
                    was_connected = connected
                    if time.monotonic() - started > RESYNC_INTERVAL:
                        return
                try:
                    entry = await watcher.updates(timeout=HEARTBEAT)
                except TimeoutError:
                    continue
                if entry is None:
                    initial_ended = True
                else:
                    revision = entry.revision or 0
                    newest = max(newest, revision)
                    values, revisions = (fresh, fresh_revisions) if fresh is not None else (self.values,
                                                                                               self.revisions)
                    if entry.operation in ("DEL", "PURGE") or entry.value is None:
                        values.pop(entry.key, None)
                        revisions.pop(entry.key, None)
                    else:
                        value = self._decoded(entry.key, entry.value)
                        if value is None and entry.key in self.values:  # keep the last good value
                            value, revision = self.values[entry.key], self.revisions.get(entry.key, 0)
                        if value is not None:
                            values[entry.key] = value
                            revisions[entry.key] = revision
                    if fresh is None:
                        self.revision = max(self.revision, newest)
                        self._changed()
                if fresh is not None and initial_ended and newest >= wanted:
                    wanted = await kv_read.newest_seq(self.nc.jetstream(), f"KV_{self.bucket}",
                                                      f"$KV.{self.bucket}.{self.key_filter}")
                    if newest >= wanted:  # the snapshot is complete
                        self.values, self.revisions = fresh, fresh_revisions
                        self.revision = newest
                        fresh = None
                        self.synced_at = time.monotonic()
                        self.ready.set()
                        self._changed()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
