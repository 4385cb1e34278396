"""Loading bpf/restricted.bpf.c with bcc, attaching it, and reading/writing its maps.

The programs stay attached and the maps stay pinned when the enforcer exits:
enforcement must not lapse while it is down. A new enforcer loads fresh
programs that reuse the pinned maps, attaches them next to the old ones
(BPF_F_ALLOW_MULTI: both run, either can deny) and only then detaches the old
ones, so there is no moment without a program.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from . import bpf_sys
from .policy_core import Key, Step

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOURCE = BPF_DIR / "restricted.bpf.c"
PIN_LAYOUT = "v1"  # bump when a pinned map's definition changes

POLICY_MAX_ENTRIES = 262_144  # per family: 131,072 allow + 131,072 deny
SESSIONS_MAX_ENTRIES = 65_536
BPF_F_ALLOW_MULTI = 2

SESSION_RESTRICTED = 1
SESSION_RECORDED = 2

PROGRAMS = (
    ("restricted_connect4", bpf_sys.CGROUP_INET4_CONNECT),
    ("restricted_connect6", bpf_sys.CGROUP_INET6_CONNECT),
    ("restricted_sendmsg4", bpf_sys.CGROUP_UDP4_SENDMSG),
    ("restricted_sendmsg6", bpf_sys.CGROUP_UDP6_SENDMSG),
)


class NetEvent(ct.Structure):
    """struct net_event in bpf/restricted.bpf.c."""

    _fields_ = [
        ("boot_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("family", ct.c_uint16),
        ("dst_port", ct.c_uint16),
        ("operation", ct.c_uint8),
        ("action", ct.c_uint8),
        ("pad", ct.c_uint8 * 6),
        ("src_addr", ct.c_uint8 * 16),
        ("dst_addr", ct.c_uint8 * 16),
        ("comm", ct.c_char * 16),
    ]


class Key4(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 4)]


class Key6(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class Settings(ct.Structure):
    _fields_ = [("enforce", ct.c_uint32), ("observe", ct.c_uint32)]


class BpfLoadError(RuntimeError):
    pass


class RestrictedBPF:
    def __init__(self, pin_dir: Path, ringbuf_bytes: int) -> None:
        from bcc import BPF, BPFProgType

        self.pin_dir = pin_dir / PIN_LAYOUT
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        cflags = [
            "-w",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DPOLICY_MAX_ENTRIES={POLICY_MAX_ENTRIES}",
            f"-DSESSIONS_MAX_ENTRIES={SESSIONS_MAX_ENTRIES}",
            f"-DRINGBUF_BYTES={ringbuf_bytes}",
        ]
        try:
            self.bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
            self.funcs = {
                name: self.bpf.load_func(name.encode(), BPFProgType.CGROUP_SOCK_ADDR, attach_type=attach_type)
                for name, attach_type in PROGRAMS
            }
        except Exception as exc:
            raise BpfLoadError(
                f"cannot load {SOURCE.name}: {exc}. If the pinned maps under {self.pin_dir} come from an "
                f"incompatible version, remove that directory (enforcement stops until the next start)"
            ) from exc
        from bcc.libbcc import lib

        self._lib = lib
        self._maps = {n: self.bpf[n.encode()] for n in ("policy4", "policy6", "settings", "sessions", "lost")}
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._cgroup_fd: int | None = None
        self.reader_cycles = 0  # completed ring-buffer polls: "everything before now was read"

    # --- attaching -----------------------------------------------------------------
    def attach(self, cgroup: Path) -> None:
        """Attach to `cgroup` (the enforcer's parent of all session cgroups) and
        detach programs left there by an earlier enforcer, in that order."""
        from bcc import BPF

        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        self._cgroup_fd = fd
        for name, attach_type in PROGRAMS:
            fn = self.funcs[name]
            BPF.attach_func(fn, fd, attach_type, BPF_F_ALLOW_MULTI)
            ours = bpf_sys.prog_id(fn.fd)
            for stale in bpf_sys.attached_prog_ids(fd, attach_type):
                if stale != ours:
                    bpf_sys.detach_prog_id(fd, attach_type, stale)
                    log.info("replaced program %d (%s) left by an earlier enforcer", stale, name)

    def close(self) -> None:
        self.stop_reader()
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None
        self.bpf.cleanup()

    # --- policy ----------------------------------------------------------------------
    def read_policy(self) -> dict[Key, int]:
        entries: dict[Key, int] = {}
        for family, table in ((4, self._maps["policy4"]), (6, self._maps["policy6"])):
            for k, v in table.items():
                entries[(family, bytes(k.addr), k.prefixlen)] = v.value
        return entries

    def apply(self, steps: Iterable[Step]) -> int:
        """Apply update steps in order; returns how many were applied."""
        k4, k6, val = Key4(), Key6(), ct.c_uint8()
        fd4, fd6 = self._maps["policy4"].map_fd, self._maps["policy6"].map_fd
        n = 0
        for step in steps:
            family, addr, plen = step.key
            key, fd = (k4, fd4) if family == 4 else (k6, fd6)
            key.prefixlen = plen
            ct.memmove(key.addr, addr, len(addr))
            if step.op == "put":
                val.value = step.verdict
                rc = self._lib.bpf_update_elem(fd, ct.byref(key), ct.byref(val), 0)
            else:
                rc = self._lib.bpf_delete_elem(fd, ct.byref(key))
            if rc < 0:
                err = ct.get_errno()
                raise OSError(err, f"policy map {step.op} {step.key}: {os.strerror(err)}")
            n += 1
        return n

    def set_settings(self, enforce: bool, observe: bool) -> None:
        self._maps["settings"][ct.c_uint32(0)] = Settings(int(enforce), int(observe))

    # --- sessions --------------------------------------------------------------------
    def add_session(self, cgroup_id: int, flags: int) -> None:
        table = self._maps["sessions"]
        table[table.Key(cgroup_id)] = table.Leaf(flags)

    def remove_session(self, cgroup_id: int) -> None:
        table = self._maps["sessions"]
        try:
            del table[table.Key(cgroup_id)]
        except KeyError:
            pass

    # --- events ----------------------------------------------------------------------
    def lost(self) -> int:
        return int(self._maps["lost"][ct.c_uint32(0)].value)

    def start_reader(self, on_event: Callable[[NetEvent], None]) -> None:
        """Read the ring buffer on a thread; `on_event` runs on that thread and
        must finish with the record (it is reused) before returning."""

        def callback(_ctx, data, _size):
            try:
                on_event(ct.cast(data, ct.POINTER(NetEvent)).contents)
            except Exception:
                log.exception("handling a network event failed")
            return 0

        self.bpf[b"events"].open_ring_buffer(callback)

        def loop() -> None:
            while not self._stop.is_set():
                self.bpf.ring_buffer_poll(50)
                self.reader_cycles += 1
            self.bpf.ring_buffer_consume()

        self._reader = threading.Thread(target=loop, name="ringbuf-network", daemon=True)
        self._reader.start()

    def stop_reader(self) -> None:
        if self._reader:
            self._stop.set()
            self._reader.join(5)
            self._reader = None
