"""Keeps the BPF policy maps equal to the network_restrictions resource in KV.

A KV mirror (runtime/kv_mirror.py) follows the key: changes as they happen,
and a full re-read after a reconnect and every 30 s, so nothing a watch missed
stays missed. Each time the mirror changes, the follower applies any revision
it has not applied yet. A value that does not decode is counted and the last
good policy stays (never opening up). An enforcer that was down starts from
the pinned maps (enforcement never lapsed) and catches up the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client

from ringfence.contract import names
from ringfence.contract.resources import NetworkRestrictions
from ringfence.runtime.kv_mirror import KvMirror
from ringfence.runtime.stopping import unless_stopped

from .policy_core import effective_entries, plan_update
from .restricted_bpf import RestrictedBPF

log = logging.getLogger(__name__)


class PolicyFollower:
    def __init__(self, bpf: RestrictedBPF, nc: Client, enabled: bool, observe: bool, counters: dict) -> None:
        self.bpf = bpf
        self.nc = nc
        self.enabled = enabled  # ssh_service.restricted_session.enabled
        self.observe = observe  # ssh_service.enhanced_recording.enabled
        self.counters = counters
        self.current = bpf.read_policy()  # what the pinned maps hold right now
        self.revision: int | None = None  # KV revision applied; 0 = known absent
        self.mirror: KvMirror[NetworkRestrictions] = KvMirror(
            nc, names.POLICY_BUCKET, names.NETWORK_RESTRICTIONS_KEY, NetworkRestrictions, self._mirror_changed,
            counters)
        self._pending = asyncio.Event()
        self.applied_at = 0.0  # monotonic time of the last confirmed sync
        self.apply_seconds = 0.0  # how long the last change took to reach the maps
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()  # set after every applied change (tests, benchmarks)
        self.ready = asyncio.Event()  # the stored policy (or its absence) is in the maps
        counters["policy_entries"] = len(self.current)
        counters.setdefault("policy_updates", 0)

    def _mirror_changed(self) -> None:
        self._pending.set()

    async def apply(self, revision: int, resource: NetworkRestrictions | None) -> None:
        """Bring the maps to `resource` (None: no resource) at `revision`."""
        async with self._lock:
            # Never go back to an older revision. Revision 0 ("never existed") after a
            # newer one means the bucket was recreated.
            if self.revision is not None and (revision == self.revision or 0 < revision < self.revision):
                return
            started = time.perf_counter()
            n = await asyncio.to_thread(self._apply_sync, resource)
            self.revision = revision
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
            self.ready.set()

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

    async def run(self, stop: asyncio.Event) -> None:
        mirror = asyncio.create_task(self.mirror.run(stop), name="policy-mirror")
        try:
            while await unless_stopped(stop, self._pending.wait()):
                self._pending.clear()
                await self.apply(self.mirror.revision, self.mirror.values.get(names.NETWORK_RESTRICTIONS_KEY))
        finally:
            mirror.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await mirror
