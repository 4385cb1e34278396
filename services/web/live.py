"""Watching a live session from the console: the one place that knows how live output reaches a joiner.

The console joins as the signed-in operator (a delegated, signed request: the
enforcer checks that operator's roles and writes session.join with them), with
a key pair made for this join; the enforcer sends the session's output sealed
to it on the join's own subject (ringfence/joinbox.py), and ends the join when
it stops hearing from us (keepalives every KEEPALIVE seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from ringfence import joinbox
from ringfence.contract import names
from ringfence.contract.api import JoinFrame, JoinInput, JoinReply, JoinRequest, SessionInfo
from ringfence.runtime.stopping import unless_stopped

from .core import ConsoleError

log = logging.getLogger(__name__)

MAX_QUEUED_FRAMES = 1024  # a browser this far behind loses frames (counted) rather than memory
KEEPALIVE = 10.0

Call = Callable[..., Awaitable[object]]  # (subject, body[, result type]): a signed request as the joining operator
Send = Callable[[dict], Awaitable[None]]  # {"o": text} output, {"r": "WxH"} resize, {"end": True}


async def join(nc: Client, call: Call, info: SessionInfo, operator: str, send: Send, stopped: asyncio.Event,
               counters: dict[str, int]) -> None:
    """Send the session's output to `send` until it ends or `stopped` is set; the enforcer writes
    session.join and session.leave with the verified operator. ConsoleError when the join is refused."""
    frames: asyncio.Queue[JoinFrame] = asyncio.Queue(MAX_QUEUED_FRAMES)
    key = joinbox.new_key()
    reply = await call(names.enforcer_subject(info.server_id, "join"),
                       JoinRequest(sid=info.sid, box_key=joinbox.public_text(key)), JoinReply)
    assert isinstance(reply, JoinReply)
    box = joinbox.box(key, reply.box_key)
    input_subject = names.enforcer_subject(info.server_id, "join_input")

    async def on_frame(msg) -> None:
        try:
            frame = joinbox.unseal_frame(box, msg.data)
        except joinbox.SealError:
            counters["live_frames_unreadable"] = counters.get("live_frames_unreadable", 0) + 1
            return
        try:
            frames.put_nowait(frame)
        except asyncio.QueueFull:
            counters["live_frames_dropped"] = counters.get("live_frames_dropped", 0) + 1

    async def keepalive() -> None:
        while not stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), KEEPALIVE)
            if not stopped.is_set():
                with contextlib.suppress(ConsoleError):
                    await call(input_subject, JoinInput(join_id=reply.join_id))

    sub = await nc.subscribe(reply.subject, cb=on_frame)
    pinger = asyncio.create_task(keepalive())
    try:
        await send({"joined": info.sid})
        while True:
            next_frame = asyncio.ensure_future(frames.get())
            if not await unless_stopped(stopped, next_frame):
                break
            frame = next_frame.result()
            for _, code, data in frame.events:
                if code in ("o", "r"):
                    await send({code: data})
            if frame.end:
                await send({"end": True})
                break
    finally:
        pinger.cancel()
        await sub.unsubscribe()
        with contextlib.suppress(ConsoleError):
            await call(input_subject, JoinInput(join_id=reply.join_id, leave=True))
