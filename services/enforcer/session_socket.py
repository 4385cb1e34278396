"""The enforcer's local socket. `ringfence run`, sshd's PAM hook and the
ForceCommand wrapper ask it to open sessions (ringfence/hooks/wire.py). The
peer is identified by the kernel (SO_PEERCRED), never by what it claims.

Protocol: one JSON line OpenSessionRequest (a program's stdin, stdout and
stderr as SCM_RIGHTS with it), one JSON line OpenSessionReply. For a program
the connection is then handed to the session's relay, which sends
`{"exit": N}` when it ends.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import pwd
import socket
import struct
from pathlib import Path

import msgspec

from ringfence.contract.api import OpenSessionReply, OpenSessionRequest
from ringfence.contract.strict import DecodeError, decode_json

from .session_core import Refused
from .session_manager import SessionManager

log = logging.getLogger(__name__)

MAX_LINE = 1024 * 1024
MAX_FDS = 3
REQUEST_TIMEOUT = 10.0
MAX_PER_UID = 64  # open requests per uid at once: one account cannot tie up the socket


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class BadRequest(Exception):
    pass


class SessionSocket:
    def __init__(self, path: Path, manager: SessionManager, counters: dict) -> None:
        self.path = path
        self.manager = manager
        self.counters = counters
        for key in ("socket_requests_refused", "socket_over_uid_limit"):
            counters.setdefault(key, 0)
        self.listener: socket.socket | None = None
        self.per_uid: dict[int, int] = {}
        self._accepting: asyncio.Task | None = None
        self._open: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o666)  # any local account may ask; what it gets depends on who it is
        listener.listen(256)
        listener.setblocking(False)
        self.listener = listener
        self._accepting = asyncio.create_task(self._accept_loop(), name="session-socket")

    async def stop(self) -> None:
        if self._accepting:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self.listener:
            self.listener.close()
            self.path.unlink(missing_ok=True)
        for task in list(self._open):
            task.cancel()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.listener is not None
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            task = asyncio.create_task(self._serve(conn))
            self._open.add(task)
            task.add_done_callback(self._open.discard)

    async def _serve(self, conn: socket.socket) -> None:
        pid, uid, _gid = peer_credentials(conn)
        if self.per_uid.get(uid, 0) >= MAX_PER_UID:
            self.counters["socket_over_uid_limit"] += 1
            log.warning("uid %d has %d requests open on the enforcer socket; refusing more", uid, MAX_PER_UID)
            await self._reply(conn, OpenSessionReply(ok=False, error=f"too many open requests for uid {uid}"))
            conn.close()
            return
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        fds: list[int] = []
        try:
            line, fds = await asyncio.wait_for(_receive(conn), REQUEST_TIMEOUT)
            req = decode_json(line, OpenSessionRequest)
            peer = self.manager.peer(pid, uid, account_name(uid))
            await self.manager.open(peer, req, fds, conn, lambda reply: self._reply(conn, reply))
        except Refused as exc:
            self.counters["socket_requests_refused"] += 1
            log.info("session refused for pid %d (uid %d): %s", pid, uid, exc)
            await self._reply(conn, OpenSessionReply(ok=False, error=str(exc)))
        except TimeoutError:
            await self._reply(conn, OpenSessionReply(ok=False, error=f"no request within {REQUEST_TIMEOUT:g}s"))
        except (BadRequest, DecodeError) as exc:
            self.counters["socket_requests_refused"] += 1
            log.info("bad request from pid %d (uid %d): %s", pid, uid, exc)
            await self._reply(conn, OpenSessionReply(ok=False, error=f"bad request: {exc}"))
        except (ConnectionError, BrokenPipeError):
            pass
        except Exception as exc:
            log.exception("session socket request failed")
            await self._reply(conn, OpenSessionReply(ok=False, error=f"internal error in the enforcer: {exc}"))
        finally:
            self.per_uid[uid] -= 1
            if not self.per_uid[uid]:
                del self.per_uid[uid]
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)  # a relay that took them has its own copies
            conn.close()

    async def _reply(self, conn: socket.socket, reply: OpenSessionReply) -> None:
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(conn, msgspec.json.encode(reply) + b"\n")


async def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One request line, with the fds that came along (at most MAX_FDS)."""
    loop = asyncio.get_running_loop()
    buf = b""
    fds: list[int] = []
    while b"\n" not in buf:
        readable = loop.create_future()
        loop.add_reader(conn.fileno(), readable.set_result, None)
        try:
            await readable
        finally:
            loop.remove_reader(conn.fileno())
        try:
            data, ancdata, flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            continue
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                fds += list(got)
        if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
            for fd in fds:
                os.close(fd)
            raise BadRequest(f"more than {MAX_FDS} file descriptors")
        if not data:
            for fd in fds:
                os.close(fd)
            raise BadRequest("the request ended before its newline")
        buf += data
        if len(buf) > MAX_LINE:
            for fd in fds:
                os.close(fd)
            raise BadRequest(f"request larger than {MAX_LINE} bytes")
    return buf.partition(b"\n")[0], fds
