"""What a plain sshd shows at an interactive login, which ForceCommand suppresses
(sshd treats the wrapper as a command): the message of the day and "Last login".
The relay shows it before the login shell, unless the user has ~/.hushlogin, as
sshd does. Read by root: lastlog before sshd records this login (at the PAM
session, before the terminal is allocated), the motd files pam_motd shows.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

LASTLOG = Path("/var/log/lastlog")
_ENTRY = struct.Struct("=i32s256s")  # struct lastlog: ll_time (int32), ll_line, ll_host
MOTD_FILES = (Path("/run/motd.dynamic"), Path("/etc/motd"))  # Debian's pam_motd lines, in order
MAX_MOTD = 64 * 1024


def last_login(uid: int, path: Path = LASTLOG) -> str:
    """sshd's line for the previous login of `uid`, or "" when there was none."""
    if uid < 0:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(uid * _ENTRY.size)
            raw = f.read(_ENTRY.size)
    except OSError:
        return ""
    if len(raw) < _ENTRY.size:
        return ""
    when, _line, host = _ENTRY.unpack(raw)
    if when <= 0:
        return ""
    text = f"Last login: {time.ctime(when)}"
    host = host.split(b"\0", 1)[0].decode(errors="replace")
    return f"{text} from {host}\n" if host else f"{text}\n"


def motd(files: tuple[Path, ...] = MOTD_FILES) -> str:
    out = []
    for path in files:
        try:
            out.append(path.read_text(errors="replace")[:MAX_MOTD])
        except OSError:
            continue
    return "".join(out)


def banner(home: str, previous_login: str) -> str:
    """The banner of an interactive login shell: motd, then the last login (sshd's order)."""
    if os.path.exists(os.path.join(home, ".hushlogin")):
        return ""
    return motd() + previous_login
