"""Loading bpf/restricted.bpf.c with bcc, attaching it, and reading/writing its maps.

The programs are attached to the root of the cgroup2 hierarchy through bpf_links
pinned next to the maps, so they judge every process of the host by the current
task (session processes, restricted logins outside sessions, sockets passed in).
They stay attached and the maps stay pinned when the enforcer exits:
enforcement must not lapse while it is down. A new enforcer loads fresh
programs that reuse the pinned maps and re-points each pinned link at its new
program (BPF_LINK_UPDATE: atomic, no moment without a program). Removing the
pins (`python -m services.enforcer.uninstall`) detaches them.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from . import bpf_sys, kernel
from .kernel import LostKey
from .netevents import NetRecord, parse_net
from .policy_core import Key, Step
from .ringbuf import RingReader

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOURCE = BPF_DIR / "restricted.bpf.c"
PIN_LAYOUT = "v2"  # bump when a pinned map's definition changes

POLICY_MAX_ENTRIES = 262_144  # per family: 131,072 allow + 131,072 deny
SESSIONS_MAX_ENTRIES = 65_536
LOGINS_MAX_ENTRIES = 65_536
LOGIN_BITS_UIDS = 1 << 20  # restricted logins below this uid are bits in login_bits too
LOST_BY_MAX_ENTRIES = 65_536
BPF_F_ALLOW_MULTI = 2

SESSION_RESTRICTED = 1
SESSION_RECORDED = 2
LOST_SOURCES = {0: "network", 1: "exec", 2: "disk"}  # struct lost_key.source

# (program, program type, attach type), all attached to the cgroup2 root.
PROGRAMS = (
    ("restricted_connect4", "CGROUP_SOCK_ADDR", bpf_sys.CGROUP_INET4_CONNECT),
    ("restricted_connect6", "CGROUP_SOCK_ADDR", bpf_sys.CGROUP_INET6_CONNECT),
    ("restricted_sendmsg4", "CGROUP_SOCK_ADDR", bpf_sys.CGROUP_UDP4_SENDMSG),
    ("restricted_sendmsg6", "CGROUP_SOCK_ADDR", bpf_sys.CGROUP_UDP6_SENDMSG),
    ("restricted_sock_create", "CGROUP_SOCK", bpf_sys.CGROUP_INET_SOCK_CREATE),
    ("restricted_egress", "CGROUP_SKB", bpf_sys.CGROUP_INET_EGRESS),
)
# Layout v1 attached these to the node's tree with BPF_PROG_ATTACH; a v2 enforcer detaches them.
LEGACY_ATTACH_TYPES = (bpf_sys.CGROUP_INET4_CONNECT, bpf_sys.CGROUP_INET6_CONNECT, bpf_sys.CGROUP_UDP4_SENDMSG,
                       bpf_sys.CGROUP_UDP6_SENDMSG)


class Key4(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 4)]


class Key6(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class Settings(ct.Structure):
    """struct settings in bpf/restricted.bpf.c."""

    _fields_ = [("enforce", ct.c_uint32), ("observe", ct.c_uint32), ("tree_id", ct.c_uint64),
                ("ringfence_id", ct.c_uint64), ("tree_level", ct.c_uint32), ("big_logins", ct.c_uint32)]


class LostKeyStruct(ct.Structure):
    """struct lost_key in bpf/ringfence.h."""

    _fields_ = [("cgroup_id", ct.c_uint64), ("uid", ct.c_uint32), ("source", ct.c_uint32)]


def _lost_key(key: LostKey) -> LostKeyStruct:
    source, cgroup_id, uid = key
    return LostKeyStruct(cgroup_id, uid, next(k for k, v in LOST_SOURCES.items() if v == source))


class BpfLoadError(RuntimeError):
    pass


def compile_flags(pin_dir: Path, ringbuf_bytes: int) -> list[str]:
    """The bcc cflags both programs are built with (bpf/ringfence.h reads them)."""
    return [
        "-w",
        f"-I{BPF_DIR}",
        f'-DPIN_DIR="{pin_dir}"',
        f"-DSESSIONS_MAX_ENTRIES={SESSIONS_MAX_ENTRIES}",
        f"-DLOST_BY_MAX_ENTRIES={LOST_BY_MAX_ENTRIES}",
        f"-DRINGBUF_BYTES={ringbuf_bytes}",
    ]


class RestrictedBPF:
    def __init__(self, pin_dir: Path, ringbuf_bytes: int) -> None:
        from bcc import BPF, BPFProgType

        self.pin_dir = pin_dir / PIN_LAYOUT
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        cflags = [*compile_flags(self.pin_dir, ringbuf_bytes), f"-DPOLICY_MAX_ENTRIES={POLICY_MAX_ENTRIES}",
                  f"-DLOGINS_MAX_ENTRIES={LOGINS_MAX_ENTRIES}"]
        try:
            self.bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
            self.funcs = {
                name: self.bpf.load_func(name.encode(), getattr(BPFProgType, prog_type), attach_type=attach_type)
                for name, prog_type, attach_type in PROGRAMS
            }
        except Exception as exc:
            raise BpfLoadError(
                f"cannot load {SOURCE.name}: {exc}. If the pinned maps under {self.pin_dir} come from an "
                f"incompatible version, remove that directory (enforcement stops until the next start)"
            ) from exc
        from bcc.libbcc import lib

        self._lib = lib
        self._maps = {n: self.bpf[n.encode()]
                      for n in ("policy4", "policy6", "settings", "sessions", "logins", "login_bits", "lost",
                                "lost_by", "lost_reported")}
        self._reader = RingReader("ringbuf-network")

    # --- attaching -----------------------------------------------------------------
    def attach(self, mount: Path, tree_root: Path) -> None:
        """Judge this node's sessions (cgroups below `tree_root`) and its restricted
        logins everywhere: link the programs to the root of the cgroup2 hierarchy
        mounted at `mount`, then detach what a layout-v1 enforcer left on the tree."""
        st = self._settings()
        st.tree_id = tree_root.stat().st_ino
        st.ringfence_id = tree_root.parent.stat().st_ino
        st.tree_level = kernel.cgroup_level(mount, tree_root)
        self._maps["settings"][ct.c_uint32(0)] = st
        for uid in self.restricted_logins():  # what the programs read first, from the set itself
            self._sync_login(uid, True)
        root_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, _type, attach_type in PROGRAMS:
                self._link(name, attach_type, root_fd)
        finally:
            os.close(root_fd)
        tree_fd = os.open(tree_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for attach_type in LEGACY_ATTACH_TYPES:
                for stale in bpf_sys.attached_prog_ids(tree_fd, attach_type):
                    bpf_sys.detach_prog_id(tree_fd, attach_type, stale)
                    log.info("detached program %d that an earlier enforcer attached to %s", stale, tree_root)
        finally:
            os.close(tree_fd)

    def _link(self, name: str, attach_type: int, root_fd: int) -> None:
        pin = self.pin_dir / f"link_{name}"
        prog_fd = self.funcs[name].fd
        if pin.exists():
            fd = bpf_sys.obj_get(str(pin))
            try:
                bpf_sys.link_update(fd, prog_fd)
            finally:
                os.close(fd)
            return
        fd = bpf_sys.link_create(prog_fd, root_fd, attach_type)
        try:
            bpf_sys.obj_pin(fd, str(pin))
        finally:
            os.close(fd)

    def close(self) -> None:
        self.stop_reader()
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

    def _settings(self) -> Settings:
        current = self._maps["settings"][ct.c_uint32(0)]
        return Settings.from_buffer_copy(bytes(current))

    def set_settings(self, enforce: bool, observe: bool) -> None:
        st = self._settings()
        st.enforce, st.observe = int(enforce), int(observe)
        self._maps["settings"][ct.c_uint32(0)] = st

    # --- sessions and restricted logins ------------------------------------------------
    def add_session(self, cgroup_id: int, flags: int) -> None:
        table = self._maps["sessions"]
        table[table.Key(cgroup_id)] = table.Leaf(flags)

    def remove_session(self, cgroup_id: int) -> None:
        table = self._maps["sessions"]
        try:
            del table[table.Key(cgroup_id)]
        except KeyError:
            pass

    def restricted_logins(self) -> set[int]:
        return {k.value for k in self._maps["logins"]}

    def restrict_login(self, uid: int) -> None:
        """From now on the processes of `uid` obey the policy wherever they run
        (pinned: it outlives this process). Root (0) is never restricted."""
        if uid == 0:
            raise ValueError("uid 0 (root) cannot be a restricted login: the enforcer and the host run as root")
        table = self._maps["logins"]
        table[table.Key(uid)] = table.Leaf(1)
        self._sync_login(uid, True)

    def release_login(self, uid: int) -> None:
        table = self._maps["logins"]
        try:
            del table[table.Key(uid)]
        except KeyError:
            pass
        self._sync_login(uid, False)

    def _sync_login(self, uid: int, restricted: bool) -> None:
        """Mirror `logins` into what the programs read first: a bit for a small uid,
        the count of large ones (the programs look those up in the hash only then)."""
        if uid < LOGIN_BITS_UIDS:
            bits = self._maps["login_bits"]
            key = ct.c_uint32(uid // 64)
            word = bits[key].value
            word = word | 1 << uid % 64 if restricted else word & ~(1 << uid % 64)
            bits[key] = ct.c_uint64(word)
            return
        st = self._settings()
        st.big_logins = sum(1 for k in self._maps["logins"] if k.value >= LOGIN_BITS_UIDS)
        self._maps["settings"][ct.c_uint32(0)] = st

    # --- records and drops -----------------------------------------------------------
    def lost(self) -> dict[str, int]:
        """The node's drop counter of the network ring buffer, since the maps were created."""
        return {"network": int(self._maps["lost"][ct.c_uint32(0)].value)}

    def lost_unreported(self) -> tuple[list[tuple[LostKey, int, int]], list[LostKey]]:
        """Drops per (source, session cgroup id or 0, uid of a login outside sessions
        or 0), from the map both programs share: ([(key, total, reported before)]
        where the total grew, [keys fully reported])."""
        reported = {(k.cgroup_id, k.uid, k.source): v.value for k, v in self._maps["lost_reported"].items()}
        grew, settled = [], []
        for k, v in self._maps["lost_by"].items():
            key = (LOST_SOURCES.get(k.source, str(k.source)), k.cgroup_id, k.uid)
            before = reported.get((k.cgroup_id, k.uid, k.source), 0)
            if v.value > before:
                grew.append((key, v.value, before))
            else:
                settled.append(key)
        return grew, settled

    def mark_lost_reported(self, key: LostKey, total: int) -> None:
        table = self._maps["lost_reported"]
        table[_lost_key(key)] = table.Leaf(total)

    def forget_lost(self, keys: Iterable[LostKey]) -> None:
        for key in keys:
            for name in ("lost_by", "lost_reported"):
                try:
                    del self._maps[name][_lost_key(key)]
                except KeyError:
                    pass

    @property
    def reader_cycles(self) -> int:
        return self._reader.cycles

    def start_reader(self, on_records: Callable[[list[NetRecord]], None]) -> None:
        """Read the ring buffer on a thread (ringbuf.py): each round's records go to
        `on_records` as one list of detached records."""
        self._reader.start(self.bpf, [(b"events_network", parse_net, on_records, "network")])

    def stop_reader(self) -> None:
        self._reader.stop()
