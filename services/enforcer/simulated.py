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

import ctypes as ct
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .policy_core import Key, Step
from .restricted_bpf import NetEvent

ENV = "RINGFENCE_SIMULATE_KERNEL"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


class SimulatedKernel:
    def __init__(self) -> None:
        self.policy: dict[Key, int] = {}
        self.enforce = False
        self.observe = False
        self.sessions: dict[int, int] = {}
        self.reader_cycles = 0
        self._records: queue.SimpleQueue[NetEvent] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def attach(self, cgroup: Path) -> None:
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

    def lost(self) -> int:
        return 0

    def generate(self, count: int, cgroup_id: int = 0) -> None:
        """Queue `count` denied-connect records, as the kernel would write them."""
        for i in range(count):
            rec = NetEvent()
            rec.boot_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            rec.cgroup_id = cgroup_id
            rec.pid = os.getpid()
            rec.family = socket.AF_INET
            rec.dst_port = 80
            rec.operation = 0
            rec.action = 1
            ct.memmove(rec.dst_addr, bytes([10, 0, (i >> 8) & 255, i & 255]), 4)
            rec.comm = b"simulated"
            self._records.put(rec)

    def start_reader(self, on_event: Callable[[NetEvent], None]) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    rec = self._records.get(timeout=0.05)
                except queue.Empty:
                    self.reader_cycles += 1
                    continue
                on_event(rec)
                while True:  # drain what is queued, then count a full round
                    try:
                        on_event(self._records.get_nowait())
                    except queue.Empty:
                        break
                self.reader_cycles += 1

        self._reader = threading.Thread(target=loop, name="simulated-records", daemon=True)
        self._reader.start()

    def stop_reader(self) -> None:
        if self._reader:
            self._stop.set()
            self._reader.join(5)
            self._reader = None
