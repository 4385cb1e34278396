"""The files the hooks run, and every directory above them, must be root's alone."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass

from .findings import HOLE, OK, WARN, Finding
from .pam_stack import PamLine, exec_command, is_ringfence_line


@dataclass(frozen=True)
class FileStat:
    path: str
    uid: int
    gid: int
    mode: int


def hook_paths(force_command: str, pam_lines: Sequence[PamLine]) -> list[tuple[str, str]]:
    """(role, path) of the programs the hooks run: the interpreter or program, and a script."""
    commands = [("PAM hook (runs as root)", exec_command(line) or "")
                for line in pam_lines if line.kind == "session" and is_ringfence_line(line)]
    commands.append(("ForceCommand wrapper (runs as each user)", force_command))
    return [(role, word) for role, command in commands for i, word in enumerate(command.split())
            if word.startswith("/") and (i == 0 or word.endswith(".py"))]


def writable_by_others(st: FileStat) -> str | None:
    """Why someone other than root can change this file or directory, or None."""
    if st.uid != 0:
        return f"owned by uid {st.uid}"
    if st.mode & stat.S_IWGRP and st.gid != 0:
        return f"writable by group {st.gid}"
    if st.mode & stat.S_IWOTH and not (stat.S_ISDIR(st.mode) and st.mode & stat.S_ISVTX):
        return "writable by everyone"
    return None


def file_findings(role: str, path: str, stats: Sequence[FileStat], exists: bool = True) -> list[Finding]:
    """A hook's files and every directory above them must be root's alone: whoever can change them runs
    code as root (the PAM hook) or as every user who logs in (the wrapper)."""
    if not exists:
        return [Finding(WARN, "files", role, path, "it does not exist: every login fails",
                        "install Ringfence there, or point the hook at where it is")]
    found = [Finding(HOLE, "files", role, st.path, f"{why}: whoever can change it runs code in the hook",
                     "chown root and chmod go-w it (and every directory above it)")
             for st in stats if (why := writable_by_others(st))]
    return found or [Finding(OK, "files", role, f"{path} ({len(stats)} files and directories, root's alone)")]
