"""What the enforcer needs from the host, checked up front with messages that name
the fix, and what it needs from the kernel side (the Kernel protocol)."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .netevents import NetRecord
    from .policy_core import Key, Step

LostKey = tuple[str, int, int]  # (source, session cgroup id or 0, uid of a login outside sessions or 0)

log = logging.getLogger(__name__)

BPFFS = "/sys/fs/bpf"
MIN_KERNEL = (5, 8)  # ring buffers, bpf_ktime_get_boot_ns, cgroup sock_addr hooks

_libc = ctypes.CDLL(None, use_errno=True)


class RecordSource(Protocol):
    """A loader whose programs write records to ring buffers read on a thread:
    RestrictedBPF, RecordingBPF and the simulated kernel."""

    reader_cycles: int  # completed reading rounds: "everything written before was read and handled"

    def lost(self) -> dict[str, int]:
        """Records dropped because a ring buffer was full, per source, since the maps were created."""
        ...

    def stop_reader(self) -> None: ...

    def close(self) -> None: ...


class Kernel(RecordSource, Protocol):
    """The restricted-session side the enforcer drives (RestrictedBPF, SimulatedKernel)."""

    def attach(self, mount: Path, tree_root: Path) -> None: ...

    # policy
    def read_policy(self) -> dict[Key, int]: ...
    def apply(self, steps: Iterable[Step]) -> int: ...
    def set_settings(self, enforce: bool, observe: bool) -> None: ...

    # sessions and restricted logins
    def add_session(self, cgroup_id: int, flags: int) -> None: ...
    def remove_session(self, cgroup_id: int) -> None: ...
    def restricted_logins(self) -> set[int]: ...
    def restrict_login(self, uid: int) -> None: ...
    def release_login(self, uid: int) -> None: ...

    # records and drops
    def start_reader(self, on_records: Callable[[list[NetRecord]], None]) -> None: ...
    def lost_unreported(self) -> tuple[list[tuple[LostKey, int, int]], list[LostKey]]: ...
    def mark_lost_reported(self, key: LostKey, total: int) -> None: ...
    def forget_lost(self, keys: Iterable[LostKey]) -> None: ...


class HostNotReady(RuntimeError):
    """The host lacks something the enforcer needs; the message says what to do."""


def mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) for every mount this process sees."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype = right.split()[0] if right else ""
        out.append((fields[4].replace("\\040", " "), fstype))
    return out


def cgroup_level(mount: Path, cgroup: Path) -> int:
    """The level of `cgroup` in the cgroup2 hierarchy mounted at `mount` (its
    root is level 0), as bpf_get_current_ancestor_cgroup_id counts. A mount of
    a subtree (a cgroup namespace) adds the depth of that subtree."""
    base = 0
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mount) and " - cgroup2 " in line:
            base = len(Path(fields[3]).parts) - 1
    return base + len(cgroup.relative_to(mount).parts)


def _mount(source: str, target: str, fstype: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise HostNotReady(f"mount -t {fstype} {source} {target} failed: {os.strerror(err)}")


def find_cgroup2(configured: str = "") -> Path:
    """The cgroup v2 mount to use.

    With `configured` (ssh_service.enhanced_recording.cgroup_path) use that
    path, mounting cgroup2 there when nothing is mounted; otherwise detect the
    host's cgroup2 mount (/sys/fs/cgroup on most hosts, /sys/fs/cgroup/unified
    in hybrid mode).
    """
    cg2 = [point for point, fstype in mounts() if fstype == "cgroup2"]
    if configured:
        path = Path(configured)
        if str(path) not in cg2:
            path.mkdir(parents=True, exist_ok=True)
            _mount("cgroup2", str(path), "cgroup2")
            log.info("mounted cgroup2 at %s", path)
        return path
    if not cg2:
        raise HostNotReady(
            "no cgroup v2 hierarchy is mounted; set ssh_service.enhanced_recording.cgroup_path "
            "(e.g. /cgroup2) and the enforcer mounts one there"
        )
    # The shortest path is the host's own mount, not a container's bind mount below it.
    return Path(sorted(cg2, key=len)[0])


def ensure_bpffs() -> Path:
    if not any(point == BPFFS and fstype == "bpf" for point, fstype in mounts()):
        Path(BPFFS).mkdir(parents=True, exist_ok=True)
        _mount("bpf", BPFFS, "bpf")
        log.info("mounted bpffs at %s", BPFFS)
    return Path(BPFFS)


def check_host() -> None:
    """Fail early, with the fix, when BPF programs cannot work here."""
    if os.geteuid() != 0:
        raise HostNotReady("the enforcer must run as root (it loads BPF programs and manages cgroups)")
    release = os.uname().release
    try:
        version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        version = MIN_KERNEL
    if version < MIN_KERNEL:
        raise HostNotReady(
            f"kernel {release} is too old: restricted sessions need Linux "
            f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer"
        )
    build = Path(f"/lib/modules/{release}/build")
    if not (build / "include").exists():
        raise HostNotReady(
            f"no kernel headers at {build}: bcc compiles the BPF programs against them. Run `make setup` "
            f"(it installs linux-headers-$(dpkg --print-architecture) and links them there when "
            f"linux-headers-{release} does not exist)"
        )
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise HostNotReady(
            f"cannot import bcc ({exc}); install python3-bpfcc and run `make setup` so the venv can see it"
        ) from None
