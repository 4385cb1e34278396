"""The relay's wire (ringfence/hooks/relay.py, standard library only, writes and
reads these shapes as plain JSON; tests/test_relay.py checks they agree).

RelaySpec: what the enforcer asks relayd to run for one session.
Journal lines (relay -> enforcer, an append-only file per session, one JSON
object per line, tagged by "t", numbered by "n" from 1): started, rec,
active, idle, sftp, exit, failed, closed.
Control lines (enforcer -> relay, on the relay's Unix socket): notice,
idle_timeout, input.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct, field

RecordMode = Literal["node", "node-sync", "off"]


class RelaySpec(Struct, omit_defaults=True):
    sid: str
    argv: list[str]  # argv[0] may be a login shell's "-bash"; `path` is what runs
    uid: int
    gid: int
    cgroup: str  # absolute path of the session's cgroup: the program moves itself there
    out: str  # the journal file
    control: str  # the relay's control socket: "@name", an abstract Unix socket
    path: str = ""  # the program; empty: argv[0], looked up in env's PATH
    env: dict[str, str] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)
    home: str = "/"
    interactive: bool = False  # a pty for the program
    take_terminal: bool = False  # the client's terminal is sshd's: take it over (see relay.py)
    record: RecordMode = "node"
    stdin_limit: int = 0  # bytes of a command's stdin that are recorded
    idle_timeout: float = 0.0
    idle_message: str = ""
    sftp: bool = False  # audit the SFTP protocol instead of recording bytes
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)  # (resource, soft, hard) of the requester
    umask: int = 0o022
    loginuid: int | None = None
    banner: str = ""  # shown before the program starts (MOTD and last login of an interactive login)


# --- journal (relay -> enforcer) ---------------------------------------------------------------------------
class _Line(Struct, tag_field="t", kw_only=True):
    n: int


class Started(_Line, tag="started"):
    pid: int
    width: int = 0
    height: int = 0
    time: int = 0  # unix seconds


class Rec(_Line, tag="rec"):
    seq: int
    ev: list[tuple[float, str, str]]  # asciicast v2 events, seconds since the relay started


class Active(_Line, tag="active"):
    """The client typed or sent something in the last second."""


class Idle(_Line, tag="idle"):
    message: str


class Sftp(_Line, tag="sftp"):
    ops: list[dict[str, Any]]  # ringfence/hooks/sftp_audit.py's operations: fields of events.SFTP


class Exit(_Line, tag="exit"):
    code: int
    signal: int = 0
    stdin_truncated: bool = False
    recs: int = 0  # rec lines written: the recording's last chunk follows them


class Failed(_Line, tag="failed"):
    message: str


class Closed(_Line, tag="closed"):
    """The relay wrote its last line."""


JournalLine = Started | Rec | Active | Idle | Sftp | Exit | Failed | Closed
journal_decoder = msgspec.json.Decoder(JournalLine)


# --- control (enforcer -> relay) ----------------------------------------------------------------------------
class Notice(Struct, tag_field="t", tag="notice", omit_defaults=True):
    message: str
    end: bool = False  # end the session after showing it


class IdleTimeout(Struct, tag_field="t", tag="idle_timeout"):
    timeout: float
    message: str


class Input(Struct, tag_field="t", tag="input"):
    data: str  # a peer's keystrokes
