"""Keeps the BPF policy maps equal to the network_restrictions resource in KV.

A KV watcher applies changes as they happen. Because a watcher can miss
updates across a disconnect, the follower also re-reads the key when the
connection comes back and every RESYNC_INTERVAL, and applies any revision it
has not applied yet. An enforcer that was down starts from the pinned maps
(enforcement never lapsed) and catches up the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from ringfence.contract import names
from ringfence.contract.resources import NetworkRestrictions
from ringfence.runtime.kv_watch import watchable_bucket

from .policy_core import effective_entries, plan_update
from .restricted_bpf import RestrictedBPF

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 10.0
CONNECTION_CHECK = 0.5


class PolicyFollower:
    def __init__(self, bpf: RestrictedBPF, nc: Client, enabled: bool, observe: bool, counters: dict) -> None:
        self.bpf = bpf
        self.nc = nc
        self.enabled = enabled  # ssh_service.restricted_session.enabled
        self.observe = observe  # ssh_service.enhanced_recording.enabled
        self.counters = counters
        self.current = bpf.read_policy()  # what the pinned maps hold right now
        self.revision: int | None = None  # KV revision applied; 0 = known absent
        self.applied_at = 0.0  # monotonic time of the last confirmed sync
        self.apply_seconds = 0.0  # how long the last change took to reach the maps
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()  # set after every applied change (tests, benchmarks)
        counters["policy_entries"] = len(self.current)
        counters.setdefault("policy_updates", 0)
        counters.setdefault("policy_errors", 0)

    async def apply(self, revision: int, value: bytes | None) -> None:
        """Bring the maps to the resource `value` (None: no resource) at `revision`."""
        async with self._lock:
            # Watch updates and re-reads race; never go back to an older revision.
            # Revision 0 ("never existed") after a newer one means the bucket was recreated.
            if self.revision is not None and (revision == self.revision or 0 < revision < self.revision):
                self.applied_at = time.monotonic()
                return
            resource = None
            if value is not None:
                try:
                    resource = msgspec.json.decode(value, type=NetworkRestrictions)
                except msgspec.DecodeError as exc:
                    # Keep enforcing the last good policy rather than opening up.
                    self.counters["policy_errors"] += 1
                    log.error("network_restrictions revision %d does not decode (%s); keeping the current policy",
                              revision, exc)
                    return
            started = time.perf_counter()
            n = await asyncio.to_thread(self._apply_sync, resource)
            self.revision = revision
            self.applied_at = time.monotonic()
            self.counters["policy_revision"] = revision
            self.counters["policy_applied_ms"] = int(time.time() * 1000)  # wall clock: fleet benchmarks
            self.counters["policy_updates"] += 1
            self.counters["policy_entries"] = len(self.current)
            self.apply_seconds = time.perf_counter() - started
            log.info("network restrictions revision %d applied: %s, %d map updates in %.1f ms",
                     revision, "allow all" if resource is None or not self.enabled else
                     f"{len(resource.spec.allow)} allow / {len(resource.spec.deny)} deny",
                     n, (time.perf_counter() - started) * 1000)
            self.changed.set()
            self.changed = asyncio.Event()

    def _apply_sync(self, resource: NetworkRestrictions | None) -> int:
        if resource is None or not self.enabled:
            # Allow-all first, then empty the tries: never more restrictive than needed.
            self.bpf.set_settings(enforce=False, observe=self.observe)
            n = self.bpf.apply(plan_update(self.current, {}))
            self.current = {}
            return n
        new = effective_entries((r.cidr for r in resource.spec.allow), (r.cidr for r in resource.spec.deny))
        n = self.bpf.apply(plan_update(self.current, new))
        self.current = new
        self.bpf.set_settings(enforce=True, observe=self.observe)
        return n

    async def resync(self, kv: KeyValue) -> None:
        try:
            entry = await kv.get(names.NETWORK_RESTRICTIONS_KEY)
        except KeyNotFoundError as exc:
            marker = getattr(exc, "entry", None)  # set when the key was deleted or purged
            await self.apply(marker.revision if marker else 0, None)
            return
        await self.apply(entry.revision, entry.value)

    async def run(self, stop: asyncio.Event) -> None:
        kv = await watchable_bucket(self.nc.jetstream(), names.POLICY_BUCKET)  # a deaf watch is replaced in ~2 s
        await self.resync(kv)
        watch_task = asyncio.create_task(self._watch(kv, stop))
        was_connected = True
        last_sync = time.monotonic()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CONNECTION_CHECK)
                connected = self.nc.is_connected
                due = time.monotonic() - last_sync >= RESYNC_INTERVAL
                if connected and (not was_connected or due or watch_task.done()):
                    try:
                        await self.resync(kv)
                        last_sync = time.monotonic()
                    except Exception as exc:
                        log.warning("policy resync failed (%s); keeping the current policy", exc)
                    if watch_task.done():
                        if not watch_task.cancelled() and watch_task.exception():
                            log.warning("policy watcher stopped: %s; restarting it", watch_task.exception())
                        watch_task = asyncio.create_task(self._watch(kv, stop))
                was_connected = connected
        finally:
            watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch_task

    async def _watch(self, kv: KeyValue, stop: asyncio.Event) -> None:
        watcher = await kv.watch(names.NETWORK_RESTRICTIONS_KEY)
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=5.0)
                except TimeoutError:
                    continue
                if entry is None:  # end of the initial values
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                await self.apply(entry.revision, None if deleted else entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
