"""Kernel exec/open records to session.command / session.disk audit events. Pure.

Conventions (those of the system Ringfence replaces, so parsers carry over):

- session.command: `path` is the filename passed to execve, `argv` the
  arguments after argv[0] (argv[0] itself is in the record, not the event),
  `program` the comm when exec returned: the new program's on success, the
  caller's on failure; `return_code` 0 or -errno.
- session.disk: `path` as passed to open (relative paths stay relative),
  `flags` the open flags, `return_code` the fd or -errno. Repeats of an open
  (same session, program, path, flags and outcome) folded in the kernel are one
  session.disk with `count` (how many) and `first_time`; `time`, `pid` and
  `return_code` are the last repeat's.
- Truncation is marked with "...": appended to a path or an argument that was
  cut, and as a last argument when arguments are missing (more than the
  kernel side keeps, or unreadable).
"""

from __future__ import annotations

from dataclasses import dataclass

from ringfence.contract.api import SessionInfo
from ringfence.contract.events import SessionCommand, SessionDisk

from .records import attribute, rfc3339, stable_uid

ELLIPSIS = "..."
# exec_event.truncated / disk_event.truncated / disk_fold_key.truncated (bpf/ringfence.h)
TRUNC_PATH = 1  # the path was longer than the buffer
TRUNC_ARGS = 2  # arguments are missing


@dataclass(frozen=True)
class CommandRecord:
    """A copy of struct exec_event (bpf/recording.bpf.c), detached from the ring buffer."""

    boot_ns: int  # CLOCK_BOOTTIME when exec returned
    wall_time: float
    cgroup_id: int
    pid: int
    ppid: int
    comm: str
    path: str
    argv: tuple[str, ...]  # argv[0] included
    return_code: int
    path_truncated: bool = False
    args_missing: bool = False  # arguments after the last one in argv were not kept
    truncated_args: frozenset[int] = frozenset()  # indexes in argv of arguments that were cut


@dataclass(frozen=True)
class DiskRecord:
    """A copy of struct disk_event (bpf/recording.bpf.c), detached from the ring buffer."""

    boot_ns: int  # CLOCK_BOOTTIME when open returned
    wall_time: float
    cgroup_id: int
    pid: int
    comm: str
    path: str
    flags: int
    return_code: int
    path_truncated: bool = False
    # > 0: the record stands for this many opens identical to one emitted before it
    # (folded in the kernel, disk_folds.py); pid, return_code and boot_ns are the last one's.
    repeats: int = 0
    first_boot_ns: int = 0
    first_wall_time: float = 0.0

    @property
    def opens(self) -> int:
        return self.repeats or 1


def command_uid(rec: CommandRecord) -> str:
    """The same record always gets the same uid: a record read again (the enforcer
    died between reading and acknowledging it) is dropped as a duplicate downstream."""
    return stable_uid(f"exec:{rec.boot_ns}:{rec.pid}:{rec.cgroup_id}")


def disk_uid(rec: DiskRecord) -> str:
    key = f"disk:{rec.boot_ns}:{rec.pid}:{rec.cgroup_id}:{rec.flags}:{rec.return_code}:{rec.path}"
    if rec.repeats:
        key += f":{rec.first_boot_ns}:{rec.repeats}:{rec.comm}"
    return stable_uid(key)


def command_event(rec: CommandRecord, session: SessionInfo | None) -> SessionCommand:
    argv = [a + ELLIPSIS if i in rec.truncated_args else a for i, a in enumerate(rec.argv)][1:]
    if rec.args_missing:
        argv.append(ELLIPSIS)
    ev = SessionCommand(
        uid=command_uid(rec),
        time=rfc3339(rec.wall_time),
        pid=rec.pid,
        ppid=rec.ppid,
        cgroup_id=rec.cgroup_id,
        program=rec.comm,
        path=rec.path + ELLIPSIS if rec.path_truncated else rec.path,
        argv=argv,
        return_code=rec.return_code,
    )
    return attribute(ev, session)


def disk_event(rec: DiskRecord, session: SessionInfo | None) -> SessionDisk:
    ev = SessionDisk(
        uid=disk_uid(rec),
        time=rfc3339(rec.wall_time),
        pid=rec.pid,
        cgroup_id=rec.cgroup_id,
        program=rec.comm,
        path=rec.path + ELLIPSIS if rec.path_truncated else rec.path,
        flags=rec.flags,
        return_code=rec.return_code,
    )
    if rec.repeats:
        ev.count = rec.repeats
        ev.first_time = rfc3339(rec.first_wall_time)
    return attribute(ev, session)
