"""Session cgroups: <cgroup2 mount>/ringfence/<nodename>/<sid>.

The directories are root-owned, so a session process running as an ordinary
login cannot write its pid into any other cgroup.procs: it cannot leave.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
IN_MODIFY = 0x2
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class CgroupTree:
    """Paths are relative to the node's tree: "<sid>" or "<connection sid>/<channel sid>"."""

    def __init__(self, mount: Path, nodename: str) -> None:
        self.mount = mount
        self.root = mount / "ringfence" / nodename
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root.parent, 0o755)
        os.chmod(self.root, 0o755)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def create(self, rel: str) -> int:
        """Create a session's cgroup; returns its id (the directory's inode)."""
        p = self.path(rel)
        p.mkdir(mode=0o755)
        return p.stat().st_ino

    def move(self, rel: str, pid: int) -> None:
        (self.path(rel) / "cgroup.procs").write_text(f"{pid}\n")

    def populated(self, rel: str) -> bool:
        """Any process in this cgroup or below it."""
        try:
            text = (self.path(rel) / "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        return "populated 1" in text

    def kill(self, rel: str) -> None:
        """SIGKILL every process of the session, and of its channels, at once (cgroup.kill, Linux 5.14+)."""
        try:
            (self.path(rel) / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            pass

    def remove(self, rel: str) -> None:
        try:
            self.path(rel).rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:  # EBUSY: still populated, or a channel cgroup is left
            log.warning("cannot remove cgroup %s yet: %s", self.path(rel), exc.strerror)

    def existing(self) -> list[str]:
        """Every session cgroup, channels before their connection (removal order)."""
        found = []
        for top in sorted(p for p in self.root.iterdir() if p.is_dir()):
            found += [f"{top.name}/{c.name}" for c in sorted(top.iterdir()) if c.is_dir()]
            found.append(top.name)
        return found

    def cgroup_of_pid(self, pid: int) -> str | None:
        """The process's cgroup v2 path (relative to the mount), or None if it is gone."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("0::"):
                return line[3:]
        return None

    def relative(self, cgroup: str) -> str | None:
        """`cgroup` relative to this node's tree, when it is inside it."""
        prefix = "/" + str(self.root.relative_to(self.mount)) + "/"
        return cgroup[len(prefix):] if cgroup.startswith(prefix) else None


class PopulatedWatcher:
    """Calls `on_change(sid)` when a session cgroup's cgroup.events changes (inotify)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[str], None]) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.watches: dict[int, str] = {}
        self.on_change = on_change
        self.loop = loop
        loop.add_reader(self.fd, self._read)

    def watch(self, sid: str, cgroup: Path) -> None:
        wd = _libc.inotify_add_watch(self.fd, str(cgroup / "cgroup.events").encode(), IN_MODIFY)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {cgroup}")
        self.watches[wd] = sid

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        off = 0
        changed = set()
        while off + _EVENT.size <= len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, off)
            off += _EVENT.size + length
            sid = self.watches.get(wd)
            if sid:
                changed.add(sid)
        for sid in changed:
            self.on_change(sid)

    def forget(self, sid: str) -> None:
        for wd, s in list(self.watches.items()):
            if s == sid:
                _libc.inotify_rm_watch(self.fd, wd)
                del self.watches[wd]

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
