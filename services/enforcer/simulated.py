"""A stand-in for the kernel side, for fleet benchmarks only.

`RINGFENCE_SIMULATE_KERNEL=1 python -m services.enforcer` runs an enforcer
without BPF or cgroup v2 (and without root): the policy tries are a dict,
session cgroups are plain directories under the data dir, and network records
come from `generate()` (the `simulate` endpoint) instead of the kernel. Every
path above the kernel (KV watches, the lock guard, the spool, JetStream, the
audit service) is the real one, which is what the fleet benchmark measures.
Never use it to protect anything: it enforces nothing.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .kernel import LostKey
from .netevents import NetRecord
from .policy_core import Key, Step

ENV = "RINGFENCE_SIMULATE_KERNEL"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


class SimulatedKernel:
    def __init__(self) -> None:
        self.policy: dict[Key, int] = {}
        self.enforce = False
        self.observe = False
        self.sessions: dict[int, int] = {}
        self.logins: set[int] = set()
        self.reader_cycles = 0
        self._records: queue.SimpleQueue[NetRecord] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def attach(self, mount: Path, tree_root: Path) -> None:
        pass

    def close(self) -> None:
        self.stop_reader()

    def read_policy(self) -> dict[Key, int]:
        return dict(self.policy)

    def apply(self, steps: Iterable[Step]) -> int:
        n = 0
        for step in steps:
            if step.op == "put":
                self.policy[step.key] = step.verdict
            else:
                self.policy.pop(step.key, None)
            n += 1
        return n

    def set_settings(self, enforce: bool, observe: bool) -> None:
        self.enforce, self.observe = enforce, observe

    def add_session(self, cgroup_id: int, flags: int) -> None:
        self.sessions[cgroup_id] = flags

    def remove_session(self, cgroup_id: int) -> None:
        self.sessions.pop(cgroup_id, None)

    def restricted_logins(self) -> set[int]:
        return set(self.logins)

    def restrict_login(self, uid: int) -> None:
        self.logins.add(uid)

    def release_login(self, uid: int) -> None:
        self.logins.discard(uid)

    def lost(self) -> dict[str, int]:
        return {"network": 0}

    def lost_unreported(self) -> tuple[list[tuple[LostKey, int, int]], list[LostKey]]:
        return [], []

    def mark_lost_reported(self, key: LostKey, total: int) -> None:
        pass

    def forget_lost(self, keys: Iterable[LostKey]) -> None:
        pass

    def generate(self, count: int, cgroup_id: int = 0) -> None:
        """Queue `count` denied-connect records, as the kernel would write them."""
        now = time.time()
        boot_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        for i in range(count):
            self._records.put(NetRecord(
                boot_ns=boot_ns + i, wall_time=now, cgroup_id=cgroup_id, pid=os.getpid(), family=socket.AF_INET,
                dst_port=80, operation=0, action=1, src_addr=bytes(16),
                dst_addr=bytes([10, 0, (i >> 8) & 255, i & 255]) + bytes(12), comm="simulated"))

    def start_reader(self, on_records: Callable[[list[NetRecord]], None]) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                batch = []
                try:
                    batch.append(self._records.get(timeout=0.05))
                    while len(batch) < 10_000:  # what is queued, then count a full round
                        batch.append(self._records.get_nowait())
                except queue.Empty:
                    pass
                if batch:
                    on_records(batch)
                self.reader_cycles += 1

        self._reader = threading.Thread(target=loop, name="simulated-records", daemon=True)
        self._reader.start()

    def stop_reader(self) -> None:
        if self._reader:
            self._stop.set()
            self._reader.join(5)
            self._reader = None
