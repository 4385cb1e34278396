"""The client side of the enforcer's session socket (see services/enforcer/session_socket.py)."""

from __future__ import annotations

import os
import socket

import msgspec

from ..contract.api import Notice, OpenSessionReply, OpenSessionRequest, SessionUpdate
from .client import CliError

MAX_LINE = 1024 * 1024
_notice = msgspec.json.Decoder(Notice)


def socket_path(data_dir: str) -> str:
    return os.path.join(data_dir, "enforcer.sock")


class EnforcerLink:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buf = b""
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise CliError(f"no enforcer socket at {path}; is the enforcer running on this host?") from None
        except OSError as exc:
            self.sock.close()
            raise CliError(f"cannot talk to the enforcer at {path}: {exc.strerror or exc}") from None

    def _line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise CliError(f"the enforcer at {self.path} closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise CliError(f"the enforcer at {self.path} sent an oversized reply")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def open(self, req: OpenSessionRequest) -> OpenSessionReply:
        """Ask for a session; raises CliError with the enforcer's reason when refused."""
        try:
            self.sock.sendall(msgspec.json.encode(req) + b"\n")
            reply = msgspec.json.decode(self._line(), type=OpenSessionReply)
        except (OSError, msgspec.DecodeError) as exc:
            raise CliError(f"no valid reply from the enforcer at {self.path}: {exc}") from None
        if not reply.ok:
            raise CliError(reply.error)
        self.sock.settimeout(None)
        return reply

    def send(self, update: SessionUpdate) -> None:
        try:
            self.sock.sendall(msgspec.json.encode(update) + b"\n")
        except OSError:
            pass  # the enforcer restarted; the session itself carries on

    def fileno(self) -> int:
        return self.sock.fileno()

    def notices(self) -> tuple[list[Notice], bool]:
        """Read what is waiting (call when readable): the notices, and whether the socket closed."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            return [], True
        if not data:
            return [], True
        self._buf += data
        found = []
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            try:
                found.append(_notice.decode(line))
            except msgspec.DecodeError:
                continue
        return found, False

    def close(self) -> None:
        self.sock.close()
