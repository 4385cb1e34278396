"""Identical opens folded in the kernel (bpf/recording.bpf.c): the two fold maps,
switched every FOLD_INTERVAL, and the counts of the map switched away from
turned into records that stand for many opens.

An exec- and open-heavy session repeats the same opens over and over: every
command's loader opens ld.so.cache and libc, every `cat` the locale files. The
kernel emits the first open of each (session, program, path, flags, outcome)
in an interval and only counts the repeats; here the counts become one
DiskRecord each (`repeats`, the first and last time, the last pid and fd),
written as one session.disk with `count`. What is kept: every distinct open
with its pid and time, and how many times, by which program and when each
repeat happened to within the interval. Only the pid and the exact time of
each repeat are not, and the session.command events carry every pid.

Runs on the recording reader's thread (ringbuf.py), between its rounds, so a
fold's summary follows the emitted open it counts repeats of.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import threading
import time
from collections.abc import Callable

from .recording_events import TRUNC_PATH, DiskRecord
from .records import boot_offset, c_text, wall_time

FOLD_INTERVAL = 1.0  # seconds between switches while opens are folded
MAX_ENTRIES = 16_384  # per fold map (DISK_FOLD_MAX_ENTRIES); a full map folds nothing more
CHUNK = 1024  # entries read per batch call


def fold_record(key, leaf, offset: float) -> DiskRecord:
    """The DiskRecord standing for the `leaf.count` repeats of `key` (struct disk_fold_key/disk_fold)."""
    first, last = min(leaf.first_ns, leaf.last_ns), max(leaf.first_ns, leaf.last_ns)
    return DiskRecord(
        boot_ns=last,
        wall_time=wall_time(last, offset),
        cgroup_id=key.cgroup_id,
        pid=leaf.last_pid,
        comm=c_text(bytes(key.comm)),
        path=c_text(bytes(key.path)),
        flags=key.flags,
        return_code=leaf.last_ret,
        path_truncated=bool(key.truncated & TRUNC_PATH),
        repeats=leaf.count,
        first_boot_ns=first,
        first_wall_time=wall_time(first, offset),
    )


class DiskFolds:
    def __init__(self, bpf) -> None:
        """`bpf`: the loaded recording program (bcc BPF) with its disk_folds map-in-map."""
        from bcc.libbcc import lib

        self._lib = lib
        self.outer = bpf[b"disk_folds"]
        self.maps = (bpf[b"disk_fold0"], bpf[b"disk_fold1"])
        self.active: int | None = None  # index in maps the programs use; None: no folding yet
        self.switched_at = 0.0
        self._requested = threading.Event()

    # --- called on any thread ------------------------------------------------------------
    def request(self) -> None:
        """Have the reader switch and write the counts in its next round (a session ended)."""
        self._requested.set()

    # --- called on the reader thread -------------------------------------------------------
    def write_due(self, drain: Callable[[], None], deliver: Callable[[list[DiskRecord]], None]) -> None:
        """Between reading rounds: when due, switch the maps and `deliver` the counts of the
        one switched away from, after `drain()` handed over the opens they are repeats of."""
        if not self.due():
            return
        if self.active is None:  # what an earlier enforcer left; no program uses either map yet
            for table in self.maps:
                self._write(table, deliver)
        idle = self.switch()
        drain()
        if idle is not None:
            self._write(idle, deliver)

    def _write(self, table, deliver: Callable[[list[DiskRecord]], None]) -> None:
        records, keys = self.read(table)
        if records:
            deliver(records)
        self.clear(table, keys)  # only once they are written: a crash before repeats them (same uids)

    def due(self) -> bool:
        if self.active is None or self._requested.is_set():
            return True
        if time.monotonic() - self.switched_at < FOLD_INTERVAL:
            return False
        if self._empty(self.maps[self.active]):
            self.switched_at = time.monotonic()  # nothing folded: look again an interval later
            return False
        return True

    def switch(self):
        """Point the programs at the other map (the first one, the first time) and return the
        map they used before, or None. The map-in-map update returns only after an RCU grace
        period, when no program still holds the old map: it can be read and emptied."""
        self._requested.clear()
        old = self.active
        self.active = 0 if old is None else 1 - old
        self.outer[ct.c_int(0)] = ct.c_int(self.maps[self.active].map_fd)
        self.switched_at = time.monotonic()
        return None if old is None else self.maps[old]

    def read(self, table) -> tuple[list[DiskRecord], list]:
        """(records for the entries that counted repeats, every key) of an idle map."""
        offset = boot_offset()
        keys, records = [], []
        for key, leaf in self._entries(table):
            keys.append(key)
            if leaf.count:
                records.append(fold_record(key, leaf, offset))
        return records, keys

    def clear(self, table, keys: list) -> None:
        """Delete `keys` from an idle map (after their records were written)."""
        for start in range(0, len(keys), CHUNK):
            part = keys[start : start + CHUNK]
            array = (table.Key * len(part))(*part)
            count = ct.c_uint32(len(part))
            if self._lib.bpf_delete_batch(table.map_fd, ct.byref(array), ct.byref(count)) != 0:
                err = ct.get_errno()
                raise OSError(err, f"BPF_MAP_DELETE_BATCH on a fold map failed: {os.strerror(err)}")

    # --- map access ------------------------------------------------------------------------
    def _empty(self, table) -> bool:
        key = table.Key()
        return self._lib.bpf_get_first_key(table.map_fd, ct.byref(key), ct.sizeof(key)) != 0

    def _entries(self, table):
        keys, leaves = (table.Key * CHUNK)(), (table.Leaf * CHUNK)()
        token = ct.c_uint32(0)
        first = True
        while True:
            count = ct.c_uint32(CHUNK)
            rc = self._lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(token), ct.byref(token),
                                            ct.byref(keys), ct.byref(leaves), ct.byref(count))
            err = ct.get_errno()
            for i in range(count.value):
                yield table.Key.from_buffer_copy(keys[i]), table.Leaf.from_buffer_copy(leaves[i])
            if rc != 0:
                if err == errno.ENOENT:  # the last batch
                    return
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on a fold map failed: {os.strerror(err)}")
            first = False
