"""Watching a live session from the console: the one place that knows how live output reaches a joiner.

Today the enforcer publishes each interactive session's terminal chunks on
names.live_subject(sid) and records a join (session.join / session.leave) when asked
on its join/leave endpoints, as `ringfence sessions join` does. When joins become a
stream the enforcer sends to the joiner, only this module changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client

from ringfence.contract import names, recording
from ringfence.contract.api import JoinRequest, SessionInfo
from ringfence.runtime.stopping import unless_stopped

from .core import ConsoleError

log = logging.getLogger(__name__)

MAX_QUEUED_CHUNKS = 1024  # a browser this far behind loses chunks (counted) rather than memory

Call = Callable[[str, object], Awaitable[object]]  # a signed request as the joining operator
Send = Callable[[dict], Awaitable[None]]  # {"o": text} output, {"r": "WxH"} resize, {"end": True}


async def join(nc: Client, call: Call, info: SessionInfo, operator: str, send: Send, stopped: asyncio.Event,
               counters: dict[str, int]) -> None:
    """Send the session's output to `send` until it ends or `stopped` is set; the enforcer writes
    session.join and session.leave with `operator`. ConsoleError when the join is refused."""
    chunks: asyncio.Queue[recording.RecordingChunk] = asyncio.Queue(MAX_QUEUED_CHUNKS)

    async def on_chunk(msg) -> None:
        try:
            chunk = recording.decode(msg.data)
        except msgspec.DecodeError:
            counters["live_chunks_undecodable"] = counters.get("live_chunks_undecodable", 0) + 1
            return
        try:
            chunks.put_nowait(chunk)
        except asyncio.QueueFull:
            counters["live_chunks_dropped"] = counters.get("live_chunks_dropped", 0) + 1

    if not info.interactive:
        raise ConsoleError(f'session "{info.sid}" is not interactive; there is no terminal to join', 409)
    sub = await nc.subscribe(names.live_subject(info.sid), cb=on_chunk)
    body = JoinRequest(sid=info.sid, user=operator)
    try:
        await call(names.enforcer_subject(info.server_id, "join"), body)
        await send({"joined": info.sid})
        while True:
            next_chunk = asyncio.ensure_future(chunks.get())
            if not await unless_stopped(stopped, next_chunk):
                break
            chunk = next_chunk.result()
            for _, code, data in chunk.events:
                if code in ("o", "r"):
                    await send({code: data})
            if chunk.end:
                await send({"end": True})
                break
    finally:
        await sub.unsubscribe()
        with contextlib.suppress(ConsoleError):
            await call(names.enforcer_subject(info.server_id, "leave"), body)
