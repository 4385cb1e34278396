"""The enforcer's local socket: `ringfence run` and the OpenSSH hooks ask it to
open a session. The peer is identified by the kernel (SO_PEERCRED), never by
what it claims."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from ringfence.contract.api import OpenSessionReply, OpenSessionRequest
from ringfence.contract.strict import DecodeError, decode_json

from .session_core import Peer, Refused

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Opener = Callable[[Peer, OpenSessionRequest], Awaitable[str]]
PeerInSession = Callable[[int], str | None]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class SessionSocket:
    def __init__(self, path: Path, opener: Opener, in_session: PeerInSession) -> None:
        self.path = path
        self.opener = opener
        self.in_session = in_session
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        # Any local account may ask; what it gets depends on who it is (SO_PEERCRED).
        os.chmod(self.path, 0o666)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._handle(reader, writer)
        except Exception as exc:
            log.exception("session socket request failed")
            reply = OpenSessionReply(ok=False, error=f"internal error in the enforcer: {exc}")
        try:
            writer.write(msgspec.json.encode(reply) + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> OpenSessionReply:
        pid, uid, _gid = peer_credentials(writer.get_extra_info("socket"))
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        except (asyncio.LimitOverrunError, ValueError):
            return OpenSessionReply(ok=False, error=f"request larger than {MAX_REQUEST} bytes")
        except TimeoutError:
            return OpenSessionReply(ok=False, error="no request within 10s")
        try:
            req = decode_json(line, OpenSessionRequest)
        except DecodeError as exc:
            return OpenSessionReply(ok=False, error=f"bad request: {exc}")
        peer = Peer(pid=pid, uid=uid, account=account_name(uid), session_path=self.in_session(pid))
        try:
            sid = await self.opener(peer, req)
        except Refused as exc:
            log.info("session refused for pid %d (uid %d): %s", pid, uid, exc)
            return OpenSessionReply(ok=False, error=str(exc))
        return OpenSessionReply(ok=True, sid=sid)
