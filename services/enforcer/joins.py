"""Operators joining this node's live sessions (`ringfence sessions join`, the console).

A join is authorised by the joining operator's roles (ringfence.auth.may_join:
the original's join_sessions, per mode) and written as session.join with the
verified operator and the mode. The session's terminal output goes to the
joiner only, sealed to the key it sent (ringfence/joinbox.py), on a subject of
the join's own; a peer's keystrokes come back sealed and go to the session's
relay. A join nobody keeps alive for JOIN_IDLE ends (session.leave).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from nacl.public import Box
from nats.aio.client import Client

from ringfence import joinbox
from ringfence.contract import names
from ringfence.contract import relay as wire
from ringfence.contract.api import ApiError, JoinFrame, JoinReply
from ringfence.contract.recording import RecordingChunk

from .session_manager import SessionManager

log = logging.getLogger(__name__)

JOIN_IDLE = 30.0  # the CLI and the console ping every 10 s
MAX_INPUT_BYTES = 64 * 1024


@dataclass
class Join:
    join_id: str
    sid: str
    operator: str
    mode: str
    box: Box
    subject: str
    last_seen: float = field(default_factory=time.monotonic)


class Joins:
    def __init__(self, nc: Client, server_id: str, sessions: SessionManager, counters: dict) -> None:
        self.nc = nc
        self.server_id = server_id
        self.sessions = sessions
        self.counters = counters
        self.by_id: dict[str, Join] = {}
        for key in ("joins_active", "join_frames_failed"):
            counters.setdefault(key, 0)

    def open(self, sid: str, operator: str, mode: str, box_key: str) -> JoinReply:
        info = self.sessions.by_sid.get(sid)
        if info is None or info.kind == "connection":
            raise ApiError(f'session "{sid}" is not running on this node', "not_found")
        if not info.interactive and mode != "observer":
            raise ApiError(f'session "{sid}" is not interactive: it can only be watched', "invalid")
        own = joinbox.new_key()
        try:
            box = joinbox.box(own, box_key)
        except joinbox.SealError as exc:
            raise ApiError(str(exc), "invalid") from None
        join_id = str(uuid.uuid4())
        join = Join(join_id, sid, operator, mode, box, names.join_subject(self.server_id, join_id))
        self.by_id[join_id] = join
        self.sessions.join(sid, operator, mode)
        self.counters["joins_active"] = len(self.by_id)
        return JoinReply(join_id=join_id, subject=join.subject, box_key=joinbox.public_text(own))

    def _mine(self, join_id: str, operator: str) -> Join:
        join = self.by_id.get(join_id)
        if join is None or join.operator != operator:  # a join is its operator's alone
            raise ApiError(f'no join "{join_id}" of {operator} on this node', "not_found")
        join.last_seen = time.monotonic()
        return join

    async def input(self, join_id: str, operator: str, sealed: bytes, leave: bool) -> None:
        join = self._mine(join_id, operator)
        if leave:
            await self.close(join, "left")
            return
        if not sealed:
            return  # a keepalive
        if join.mode != "peer":
            raise ApiError(f"a join as {join.mode} cannot type into the session; join as peer", "access_denied")
        try:
            data = joinbox.unseal(join.box, sealed)
        except joinbox.SealError as exc:
            raise ApiError(str(exc), "invalid") from None
        if len(data) > MAX_INPUT_BYTES:
            raise ApiError(f"input of {len(data)} bytes is over the limit of {MAX_INPUT_BYTES}", "invalid")
        await self.sessions.tell(join.sid, wire.Input(data=data.decode(errors="replace")))

    def on_chunk(self, chunk: RecordingChunk) -> None:
        """Called with each chunk of a session's recording, as it is made."""
        watchers = [j for j in self.by_id.values() if j.sid == chunk.sid]
        if not watchers:
            return
        events = [e for e in chunk.events if e[1] in ("o", "r")]
        for join in watchers:
            if events or chunk.end:
                self._send(join, JoinFrame(events=events, end=chunk.end))
            if chunk.end:
                self._forget(join)

    def session_ended(self, sid: str) -> None:
        for join in [j for j in self.by_id.values() if j.sid == sid]:
            self._send(join, JoinFrame(end=True, reason="the session ended"))
            self._forget(join)

    async def close(self, join: Join, reason: str) -> None:
        self._send(join, JoinFrame(end=True, reason=reason))
        self._forget(join)
        self.sessions.leave(join.sid, join.operator)

    def _forget(self, join: Join) -> None:
        self.by_id.pop(join.join_id, None)
        self.counters["joins_active"] = len(self.by_id)

    def _send(self, join: Join, frame: JoinFrame) -> None:
        task = asyncio.get_running_loop().create_task(self.nc.publish(join.subject, joinbox.seal_frame(join.box,
                                                                                                       frame)))
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception():
            self.counters["join_frames_failed"] += 1
            log.warning("a live join frame was not sent: %s", task.exception())

    async def expire_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
            now = time.monotonic()
            for join in [j for j in self.by_id.values() if now - j.last_seen > JOIN_IDLE]:
                log.info("join %s of session %s by %s timed out", join.join_id, join.sid, join.operator)
                await self.close(join, "the join timed out")
