"""Loading bpf/recording.bpf.c with bcc: enhanced recording of exec and open.

The programs attach to syscall tracepoints, filter on the enforcer's pinned
`sessions` map (SESSION_RECORDED) in the kernel, and write variable-length
records to two pinned ring buffers (events_exec, events_disk) next to the
restricted-session maps (same PIN_DIR). Unlike the cgroup programs,
tracepoint attachments end with the process that made them: commands and
opens are recorded only while the enforcer runs. The pinned ring buffers and
drop counters stay, so records emitted before it stopped are read by the next
enforcer.
"""

from __future__ import annotations

import ctypes
import ctypes as ct
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from . import kernel
from .disk_folds import MAX_ENTRIES as DISK_FOLD_MAX_ENTRIES
from .disk_folds import DiskFolds
from .recording_events import TRUNC_ARGS, TRUNC_PATH, CommandRecord, DiskRecord
from .records import c_text, wall_time
from .restricted_bpf import PIN_LAYOUT, BpfLoadError, compile_flags
from .ringbuf import RingReader

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOURCE = BPF_DIR / "recording.bpf.c"

# Limits compiled into bpf/recording.bpf.c.
MAX_ARGS = 20
ARG_BYTES = 128  # per argument, NUL included
EXEC_PATH_BYTES = 512
DISK_PATH_BYTES = 512

RECORDING_POLL_MS = 50  # see ringbuf.POLL_MS

# struct exec_event / struct disk_event headers (the strings follow).
EXEC_HEADER = struct.Struct("<QQIIiIHHHH16s")
DISK_HEADER = struct.Struct("<QQIiiHH16s")

# (tracepoint, program, required): open and creat exist on x86_64, not on arm64.
TRACEPOINTS = (
    ("syscalls:sys_enter_execve", "rec_enter_execve", True),
    ("syscalls:sys_exit_execve", "rec_exit_exec", True),
    ("syscalls:sys_enter_execveat", "rec_enter_execveat", True),
    ("syscalls:sys_exit_execveat", "rec_exit_exec", True),
    ("sched:sched_process_exec", "rec_sched_exec", True),
    ("syscalls:sys_enter_openat", "rec_enter_openat", True),
    ("syscalls:sys_exit_openat", "rec_exit_open", True),
    ("syscalls:sys_enter_openat2", "rec_enter_openat2", False),
    ("syscalls:sys_exit_openat2", "rec_exit_open", False),
    ("syscalls:sys_enter_open", "rec_enter_open", False),
    ("syscalls:sys_exit_open", "rec_exit_open", False),
    ("syscalls:sys_enter_creat", "rec_enter_creat", False),
    ("syscalls:sys_exit_creat", "rec_exit_open", False),
)

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_libc = ctypes.CDLL(None, use_errno=True)


# --- records ---------------------------------------------------------------------------
def parse_exec(raw: bytes, offset: float) -> CommandRecord:
    """A detached CommandRecord from one events_exec record; `offset` from boot_offset()."""
    (boot_ns, cgroup_id, pid, ppid, ret, args_trunc, path_len, args_len, argc, truncated,
     comm) = EXEC_HEADER.unpack_from(raw)
    data = raw[EXEC_HEADER.size:]
    args = data[path_len : path_len + args_len].split(b"\0")[:argc]
    return CommandRecord(
        boot_ns=boot_ns,
        wall_time=wall_time(boot_ns, offset),
        cgroup_id=cgroup_id,
        pid=pid,
        ppid=ppid,
        comm=c_text(comm),
        path=c_text(data[:path_len]),
        argv=tuple(a.decode("utf-8", "backslashreplace") for a in args),
        return_code=ret,
        path_truncated=bool(truncated & TRUNC_PATH),
        args_missing=bool(truncated & TRUNC_ARGS),
        truncated_args=frozenset(i for i in range(MAX_ARGS) if args_trunc >> i & 1) if args_trunc else frozenset(),
    )


def parse_disk(raw: bytes, offset: float) -> DiskRecord:
    """A detached DiskRecord from one events_disk record; `offset` from boot_offset()."""
    boot_ns, cgroup_id, pid, flags, ret, path_len, truncated, comm = DISK_HEADER.unpack_from(raw)
    return DiskRecord(
        boot_ns=boot_ns,
        wall_time=wall_time(boot_ns, offset),
        cgroup_id=cgroup_id,
        pid=pid,
        comm=c_text(comm),
        path=c_text(raw[DISK_HEADER.size : DISK_HEADER.size + path_len]),
        flags=flags,
        return_code=ret,
        path_truncated=bool(truncated & TRUNC_PATH),
    )


# --- host ------------------------------------------------------------------------------
def ensure_tracefs() -> Path:
    """The tracefs directory (bcc finds tracepoints there), mounting it when absent."""
    for path in TRACEFS_CANDIDATES:
        if (path / "events").is_dir():
            return path
    target = TRACEFS_CANDIDATES[0]
    if _libc.mount(b"tracefs", str(target).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise kernel.HostNotReady(f"mount -t tracefs tracefs {target} failed: {os.strerror(err)}")
    log.info("mounted tracefs at %s", target)
    return target


_BTF_KIND_STRUCT, _BTF_KIND_UNION = 4, 5
# Bytes following the 12-byte btf_type, per kind: fixed, and per vlen item.
_BTF_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0), 15: (0, 12),
              17: (4, 0), 19: (0, 12)}


def btf_member_offsets(struct_name: str, members: tuple[str, ...], btf: Path = VMLINUX_BTF) -> dict[str, int]:
    """Byte offsets of `members` (looked for through anonymous structs/unions) in
    `struct struct_name`, from the running kernel's BTF. The kernel headers bcc
    compiles against may come from another kernel version, so their layout of
    task_struct cannot be trusted; BTF describes the running kernel."""
    data = btf.read_bytes()
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != 0xEB9F:
        raise ValueError(f"{btf}: not BTF")
    strings = hdr_len + str_off

    def name(off: int) -> bytes:
        return data[strings + off : data.index(b"\0", strings + off)]

    # Per type id: (kind, name_off, kind_flag, position of the member array, vlen).
    types: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    unpack = struct.Struct("<III").unpack_from
    while pos < end:
        name_off, info, _size = unpack(data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        fixed, per = _BTF_EXTRA.get(kind, (0, 0))
        types.append((kind, name_off, info >> 31, pos + 12, vlen))
        pos += 12 + fixed + per * vlen

    def find(type_id: int, member: bytes) -> int | None:
        _kind, _name, kflag, mpos, vlen = types[type_id]
        for i in range(vlen):
            m_name, m_type, m_off = unpack(data, mpos + 12 * i)
            bits = m_off & 0xFFFFFF if kflag else m_off
            if m_name and name(m_name) == member:
                return bits
            if not m_name and types[m_type][0] in (_BTF_KIND_STRUCT, _BTF_KIND_UNION):
                inner = find(m_type, member)
                if inner is not None:
                    return bits + inner
        return None

    wanted = struct_name.encode()
    for type_id, (kind, name_off, _kf, _mpos, vlen) in enumerate(types):
        if kind == _BTF_KIND_STRUCT and vlen and name(name_off) == wanted:
            out = {}
            for m in members:
                bits = find(type_id, m.encode())
                if bits is None or bits % 8:
                    raise ValueError(f"{btf}: struct {struct_name} has no byte-aligned member {m}")
                out[m] = bits // 8
            return out
    raise ValueError(f"{btf}: no struct {struct_name}")


def task_offsets() -> tuple[int, int]:
    """(real_parent, tgid) offsets in struct task_struct; (-1, -1) without BTF (ppid is then 0)."""
    try:
        off = btf_member_offsets("task_struct", ("real_parent", "tgid"))
    except (OSError, ValueError) as exc:
        log.warning("no task_struct layout from BTF (%s): session.command events carry ppid 0", exc)
        return -1, -1
    return off["real_parent"], off["tgid"]


# --- loader ----------------------------------------------------------------------------
class RecordingBPF:
    def __init__(self, pin_dir: Path, ringbuf_bytes: int) -> None:
        """`pin_dir` is the same directory given to RestrictedBPF (its PIN_LAYOUT
        subdirectory holds the shared `sessions` map); `ringbuf_bytes` sizes each
        of the two ring buffers (a power of two, at least a page)."""
        from bcc import BPF

        tracefs = ensure_tracefs()
        self.pin_dir = pin_dir / PIN_LAYOUT
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        parent_off, tgid_off = task_offsets()
        cflags = [*compile_flags(self.pin_dir, ringbuf_bytes), f"-DTASK_REAL_PARENT_OFF={parent_off}",
                  f"-DTASK_TGID_OFF={tgid_off}", f"-DDISK_FOLD_MAX_ENTRIES={DISK_FOLD_MAX_ENTRIES}"]
        self.bpf = None
        self.attached: list[str] = []
        try:
            self.bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
            for tp, fn, required in TRACEPOINTS:
                category, event = tp.split(":")
                if not (tracefs / "events" / category / event).is_dir():
                    if required:
                        raise RuntimeError(f"tracepoint {tp} does not exist")
                    continue
                self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
                self.attached.append(tp)
        except Exception as exc:
            if self.bpf is not None:
                self.bpf.cleanup()
            raise BpfLoadError(
                f"cannot load {SOURCE.name}: {exc}. If the pinned maps under {self.pin_dir} come from an "
                f"incompatible version, stop the enforcer and run `python -m services.enforcer.uninstall`"
            ) from exc
        self._reader = RingReader("ringbuf-recording", RECORDING_POLL_MS)
        self.folds = DiskFolds(self.bpf)

    def close(self) -> None:
        """Stop reading and detach the tracepoints; the pinned maps stay."""
        self.stop_reader()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def lost(self) -> dict[str, int]:
        """Records dropped since the pinned counters were created, by EventsLost source."""
        return {
            "exec": int(self.bpf[b"lost_exec"][ct.c_uint32(0)].value),
            "disk": int(self.bpf[b"lost_disk"][ct.c_uint32(0)].value),
        }

    @property
    def reader_cycles(self) -> int:
        return self._reader.cycles

    def start_reader(self, on_commands: Callable[[list[CommandRecord]], None],
                     on_disks: Callable[[list[DiskRecord]], None]) -> None:
        """Read both ring buffers on one thread (ringbuf.py): each round's commands and
        opens go to the callbacks as lists of detached records; between rounds, when
        due, the fold maps are switched and their counts go to `on_disks` too, after
        the opens they count repeats of."""
        self._reader.start(self.bpf, [(b"events_exec", parse_exec, on_commands, "command"),
                                      (b"events_disk", parse_disk, on_disks, "disk")],
                           lambda drain: self.folds.write_due(drain, on_disks))

    def request_folds(self) -> None:
        """Write the counts of folded opens in the reader's next round (a session ended)."""
        self.folds.request()

    def stop_reader(self) -> None:
        self._reader.stop()
