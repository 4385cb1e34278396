"""Throwaway host objects for tests: an ordinary login, a network namespace, a
cgroup outside every Ringfence tree. Each has a unique name and is removed after."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from services.enforcer.kernel import find_cgroup2


@contextlib.contextmanager
def login(uid: int | None = None) -> Iterator[pwd.struct_passwd]:
    """A new ordinary login (shell /bin/sh, no home; `uid` or the next free one), deleted afterwards."""
    name = f"rfk{uuid.uuid4().hex[:8]}"
    extra = ["--uid", str(uid)] if uid is not None else []
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", *extra, name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", name], check=False)


@contextlib.contextmanager
def netns_with_ping() -> Iterator[str]:
    """A network namespace with loopback up and ping sockets allowed for every group
    (net.ipv4.ping_group_range, as systemd sets it): the host's own setting stays."""
    name = f"rfk{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def foreign_cgroup() -> Iterator[Path]:
    """A cgroup outside every Ringfence tree (as cron's or a user manager's)."""
    path = find_cgroup2() / f"rfk{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1")
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                os.sched_yield()
