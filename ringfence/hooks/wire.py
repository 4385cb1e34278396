"""The enforcer socket protocol, for the standard-library-only hooks.

A client sends one JSON request line (ringfence/contract/api.py
OpenSessionRequest); a session that runs a program sends its stdin, stdout and
stderr with it as SCM_RIGHTS. Replies are JSON lines: OpenSessionReply, then,
for a program, `{"exit": N}` when it ends. The client talks only to a socket
whose peer is root (SO_PEERCRED), found from root-owned configuration.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct

DEFAULT_DATA_DIR = "/var/lib/ringfence"
SOCKET_NAME = "enforcer.sock"
MAX_LINE = 64 * 1024  # a request or reply line; the enforcer refuses longer ones


class HookError(Exception):
    """Shown to the user as it is."""


def socket_path(argv: list[str]) -> str:
    """The socket from `--socket PATH` or `--data-dir DIR` (both come from root-owned
    sshd and PAM configuration), else the default data dir."""
    for flag, make in (("--socket", lambda v: v), ("--data-dir", lambda v: os.path.join(v, SOCKET_NAME))):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 < len(argv):
                return make(argv[i + 1])
    return os.path.join(DEFAULT_DATA_DIR, SOCKET_NAME)


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


def connect(path: str, timeout: float | None) -> socket.socket:
    """A connection to the enforcer at `path`, refusing any peer but root."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise HookError(f"no enforcer socket at {path}; is the Ringfence enforcer running on this host?") from None
    except OSError as exc:
        sock.close()
        raise HookError(f"cannot reach the Ringfence enforcer at {path}: {exc.strerror or exc}") from None
    uid = peer_uid(sock)
    if uid != 0:
        sock.close()
        raise HookError(f"{path} is served by uid {uid}, not root; refusing to use it")
    return sock


def send(sock: socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise HookError(f"request of {len(data)} bytes is over the limit of {MAX_LINE}")
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:  # (sendall of nothing still sends: EPIPE once the peer has answered and closed)
        sock.sendall(data)


class Lines:
    """JSON lines from a socket, each at most MAX_LINE bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> dict | None:
        """The next message, or None when the peer closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except InterruptedError:
                continue
            if not chunk:
                return None
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise HookError("the enforcer sent an oversized reply")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise HookError("the enforcer sent a reply that is not JSON") from None
        if not isinstance(message, dict):
            raise HookError("the enforcer sent a reply that is not a JSON object")
        return message


def open_session(path: str, request: dict, fds: list[int] | tuple[int, ...] = (),
                 timeout: float = 30.0) -> tuple[socket.socket, Lines, dict]:
    """Ask for a session; returns the connection and the reply, or raises HookError
    with the enforcer's reason when refused."""
    sock = connect(path, timeout)
    try:
        send(sock, request, fds)
        lines = Lines(sock)
        reply = lines.next()
    except OSError as exc:
        sock.close()
        raise HookError(f"no reply from the Ringfence enforcer at {path}: {exc.strerror or exc}") from None
    except HookError:
        sock.close()
        raise
    if reply is None:
        sock.close()
        raise HookError(f"the Ringfence enforcer at {path} closed the connection without a reply")
    if not reply.get("ok"):
        sock.close()
        raise HookError(str(reply.get("error") or "refused by the Ringfence enforcer"))
    sock.settimeout(None)
    return sock, lines, reply


def wait_exit(lines: Lines) -> int:
    """The program's exit status, when the relay reports it; 255 if the connection ends first."""
    while True:
        try:
            message = lines.next()
        except (OSError, HookError):
            return 255
        if message is None:
            return 255
        if "exit" in message:
            code = message["exit"]
            return code if isinstance(code, int) and 0 <= code <= 255 else 255
