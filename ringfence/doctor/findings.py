"""A finding, where Ringfence is installed, and the hook command forms it expects (in one place)."""

from __future__ import annotations

import re
from dataclasses import dataclass

HOLE, WARN, OK = "HOLE", "WARN", "ok"

# The sshd ForceCommand Ringfence expects: the isolated wrapper script (what
# `ringfence hooks` prints: `.../python3 -I -S .../ringfence/hooks/ssh_session.py --data-dir D`).
_WHERE = r"(\s+--(socket|data-dir)\s+/\S+)*$"
FORCE_COMMAND = re.compile(r"^/\S*/python(3(\.\d+)?)? -I -S /\S*/ringfence/hooks/ssh_session\.py" + _WHERE)
# Ringfence's PAM session line runs this command (after pam_exec's options): the hook
# script, isolated from the PAM environment (-I: no PYTHON* variables, no user site; -S: no site).
PAM_HOOK_COMMAND = re.compile(r"^/\S*/python(3(\.\d+)?)? -I -S /\S*/ringfence/hooks/pam_hook\.py" + _WHERE)
# The older form: the whole CLI, run as root with the PAM environment.
OLD_PAM_HOOK_COMMAND = re.compile(r"^/\S*\bringfence\s+pam-hook(\s|$)")
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/ringfence.conf"


@dataclass(frozen=True)
class Finding:
    status: str  # HOLE, WARN or ok
    source: str  # sshd, pam, files
    setting: str
    value: str
    why: str = ""
    fix: str = ""
    fix_in: str = ""  # the file (or Match block) the fix goes into
    where: str = ""  # a Match block or file:line the value comes from

    def line(self) -> str:
        text = f"{self.status:<5} {self.source} {self.setting} {self.value}".rstrip()
        if self.where:
            text += f" ({self.where})"
        if self.why:
            text += f": {self.why}"
        if self.fix:
            text += f". Fix: {self.fix}" + (f" in {self.fix_in}" if self.fix_in else "")
        return text


@dataclass(frozen=True)
class Install:
    """Where this Ringfence is installed: the fixes name real paths."""

    python: str = "/usr/bin/python3"
    package: str = "/usr/lib/python3/dist-packages/ringfence"
    sshd_fix_in: str = SSHD_DROP_IN
    pam_file: str = "/etc/pam.d/sshd"
    force_command: re.Pattern = FORCE_COMMAND
    data_dir: str = "/var/lib/ringfence"

    @property
    def force_command_line(self) -> str:
        return f"{self.python} -I -S {self.package}/hooks/ssh_session.py --data-dir {self.data_dir}"

    @property
    def pam_line(self) -> str:
        return (f"session requisite pam_exec.so quiet stdout {self.python} -I -S {self.package}/hooks/pam_hook.py "
                f"--data-dir {self.data_dir}")
