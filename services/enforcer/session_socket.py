"""The enforcer's local socket. `ringfence run`, sshd's PAM hook and the
ForceCommand wrapper ask it to open sessions. The peer is identified by the
kernel (SO_PEERCRED), never by what it claims.

Protocol: one JSON line OpenSessionRequest, one JSON line OpenSessionReply.
For channels the connection then stays open: SessionUpdate lines come in
(terminal stream, activity), Notice lines go out (why the session ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import socket
import struct
from pathlib import Path

import msgspec

from ringfence.contract.api import OpenSessionReply, OpenSessionRequest, SessionUpdate
from ringfence.contract.strict import DecodeError, decode_json

from .session_core import Refused
from .session_manager import SessionManager

log = logging.getLogger(__name__)

MAX_LINE = 1024 * 1024


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class SessionSocket:
    def __init__(self, path: Path, manager: SessionManager, counters: dict) -> None:
        self.path = path
        self.manager = manager
        self.counters = counters
        counters.setdefault("updates_rejected", 0)
        self.server: asyncio.base_events.Server | None = None
        self._inode = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        # Any local account may ask; what it gets depends on who it is (SO_PEERCRED).
        os.chmod(self.path, 0o666)
        self._inode = self.path.stat().st_ino

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            # Gone with us, so a client is told "no enforcer socket" rather than "connection
            # refused"; unless another enforcer has put its own socket there since.
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _reply(self, writer: asyncio.StreamWriter, reply: OpenSessionReply) -> None:
        writer.write(msgspec.json.encode(reply) + b"\n")
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:
            log.exception("session socket request failed")
            with contextlib.suppress(Exception):
                await self._reply(writer, OpenSessionReply(ok=False, error=f"internal error in the enforcer: {exc}"))
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid, _gid = peer_credentials(writer.get_extra_info("socket"))
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        except (asyncio.LimitOverrunError, ValueError):
            return await self._reply(writer, OpenSessionReply(ok=False, error=f"request larger than {MAX_LINE} bytes"))
        except TimeoutError:
            return await self._reply(writer, OpenSessionReply(ok=False, error="no request within 10s"))
        try:
            req = decode_json(line, OpenSessionRequest)
        except DecodeError as exc:
            return await self._reply(writer, OpenSessionReply(ok=False, error=f"bad request: {exc}"))
        peer = self.manager.peer(pid, uid, account_name(uid))
        try:
            info = await self.manager.open(peer, req)
        except Refused as exc:
            log.info("session refused for pid %d (uid %d): %s", pid, uid, exc)
            return await self._reply(writer, OpenSessionReply(ok=False, error=str(exc)))
        if info.kind == "connection":  # the PAM hook does not stay
            return await self._reply(writer, OpenSessionReply(ok=True, sid=info.sid, user=info.user))
        link = self.manager.attach_link(info, writer, req)
        await self._reply(writer, OpenSessionReply(ok=True, sid=info.sid, user=info.user, record=link.record))
        try:
            await self._follow(info.sid, reader)
        finally:
            self.manager.detach_link(info.sid)

    async def _follow(self, sid: str, reader: asyncio.StreamReader) -> None:
        """Read the channel's updates until its wrapper closes the socket."""
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                self.counters["updates_rejected"] += 1
                log.warning("session %s sent an update over %d bytes; stopped reading it", sid, MAX_LINE)
                return
            if not line:
                return
            try:
                update = msgspec.json.decode(line, type=SessionUpdate)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # bad UTF-8, deep nesting
                self.counters["updates_rejected"] += 1
                log.warning("session %s sent a bad update: %s", sid, exc)
                continue
            self.manager.on_update(sid, update)
            if update.end:
                return
