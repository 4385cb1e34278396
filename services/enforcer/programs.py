"""What a session's relay runs, and as whom (RelaySpec), from root-owned facts:
the login's passwd entry, the requesting process's limits and umask, the
client's request only for what to run (which runs as the login anyway)."""

from __future__ import annotations

import os
import pwd
import resource
import shutil
from pathlib import Path

from ringfence.contract.api import SessionInfo
from ringfence.contract.relay import RecordMode, RelaySpec

from .relays import control_name

SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/ssh/sftp-server",
                "/usr/libexec/sftp-server")
SFTP_NAMES = ("internal-sftp", "sftp", "sftp-server")
MAX_ENV_BYTES = 256 * 1024

# /proc/<pid>/limits labels and Linux's RLIMIT_* numbers (the resource module lacks some).
_LIMITS = {
    "Max cpu time": 0, "Max file size": 1, "Max data size": 2, "Max stack size": 3, "Max core file size": 4,
    "Max resident set": 5, "Max processes": 6, "Max open files": 7, "Max locked memory": 8,
    "Max address space": 9, "Max file locks": 10, "Max pending signals": 11, "Max msgqueue size": 12,
    "Max nice priority": 13, "Max realtime priority": 14, "Max realtime timeout": 15,
}


class ProgramError(ValueError):
    """The session cannot run what was asked; the message is for the user."""


def parse_limits(text: str) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) from /proc/<pid>/limits text."""
    out = []
    for line in text.splitlines()[1:]:
        for label, res in _LIMITS.items():
            if line.startswith(label):
                soft, hard = line[len(label):].split()[:2]
                out.append((res, _limit(soft), _limit(hard)))
    return out


def _limit(value: str) -> int:
    return resource.RLIM_INFINITY if value == "unlimited" else int(value)


def process_facts(pid: int) -> dict:
    """Limits, umask and loginuid of `pid` (PAM set them up for the login's processes)."""
    facts: dict = {}
    proc = Path(f"/proc/{pid}")
    try:
        facts["rlimits"] = parse_limits((proc / "limits").read_text())
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("Umask:"):
                facts["umask"] = int(line.split()[1], 8)
        loginuid = int((proc / "loginuid").read_text())
        if loginuid != 0xFFFFFFFF:
            facts["loginuid"] = loginuid
    except (OSError, ValueError):
        pass
    return facts


def is_sftp(command: list[str]) -> bool:
    """sshd hands ForceCommand a subsystem's whole command line, e.g. `internal-sftp -l INFO`."""
    program = command[0].split(maxsplit=1)[0] if command and command[0].strip() else ""
    return program in SFTP_NAMES or program.endswith("/sftp-server")


def ssh_program(shell: str, command: list[str]) -> tuple[str, list[str], bool]:
    """(path, argv, sftp) for what an SSH client asked: a login shell, `shell -c CMD` or sftp-server."""
    shell = shell or "/bin/sh"
    if is_sftp(command):
        server = next((p for p in SFTP_SERVERS if os.path.exists(p)), None) or shutil.which("sftp-server")
        if not server:
            raise ProgramError("sftp is not available: no sftp-server binary on this host")
        return server, [server, *command[0].split()[1:]], True
    if command:
        return shell, [os.path.basename(shell), "-c", command[0]], False
    return shell, ["-" + os.path.basename(shell)], False


def bounded_env(env: dict[str, str]) -> dict[str, str]:
    size = sum(len(k) + len(v) + 2 for k, v in env.items())
    if size > MAX_ENV_BYTES:
        raise ProgramError(f"the environment is {size} bytes, over the limit of {MAX_ENV_BYTES}")
    return env


def relay_spec(info: SessionInfo, *, account: pwd.struct_passwd, path: str, argv: list[str], env: dict[str, str],
               interactive: bool, take_terminal: bool, sftp: bool, record: RecordMode, stdin_limit: int,
               idle_timeout: float, idle_message: str, cgroup: Path, journal_dir: Path, requester: int,
               banner: str = "") -> RelaySpec:
    env = dict(bounded_env(env))
    env.update(RINGFENCE_SESSION_ID=info.sid, RINGFENCE_USER=info.user)
    facts = process_facts(requester)
    return RelaySpec(
        sid=info.sid, argv=argv, path=path, env=env, uid=account.pw_uid, gid=account.pw_gid,
        groups=os.getgrouplist(account.pw_name, account.pw_gid), home=account.pw_dir or "/",
        cgroup=str(cgroup), out=str(journal_dir / f"{info.sid}.jsonl"), control=control_name(info.sid),
        interactive=interactive, take_terminal=take_terminal, record=record, stdin_limit=stdin_limit,
        idle_timeout=idle_timeout, idle_message=idle_message, sftp=sftp, rlimits=facts.get("rlimits", []),
        umask=facts.get("umask", 0o022), loginuid=facts.get("loginuid"), banner=banner,
    )
