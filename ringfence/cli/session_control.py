"""`ringfence sessions join SID` and `ringfence sessions kill SID`.

Both find the session's node in the fleet-wide sessions bucket and talk to
that node's enforcer. join asks, as the signed-in operator, to join in a mode
(observer: watch; peer: watch and type; moderator: watch, and may end it with
`sessions kill`); the enforcer checks the operator's roles (join_sessions),
writes session.join and sends the terminal output sealed to a key made for
this join alone, so nobody else holding a NATS credential can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import signal
import sys
import termios
import tty

from .. import joinbox
from ..contract import names
from ..contract.api import JoinInput, JoinReply, JoinRequest, KillRequest, SessionInfo
from . import sessions
from .client import CliError, call, open_client

KEEPALIVE = 10.0  # the enforcer ends a join it has not heard of for 30 s
ESCAPE = b"\x1d"  # Ctrl-]: leave a peer join (every other key goes to the session)


async def find_session(nc, sid: str) -> SessionInfo:
    for info in await sessions.read_sessions(nc):
        if info.sid == sid:
            return info
    raise CliError(f'no active session "{sid}" (see `ringfence sessions ls`)')


async def run_join(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    key = joinbox.new_key()
    try:
        info = await find_session(nc, args.sid)
        ended = asyncio.Event()
        out = sys.stdout.buffer
        reason = ""
        subject = names.enforcer_subject(info.server_id, "join_input")
        reply: JoinReply = await call(nc, names.enforcer_subject(info.server_id, "join"),
                                      JoinRequest(sid=args.sid, box_key=joinbox.public_text(key), mode=args.mode),
                                      JoinReply)
        box = joinbox.box(key, reply.box_key)

        async def on_frame(msg) -> None:
            nonlocal reason
            try:
                frame = joinbox.unseal_frame(box, msg.data)
            except joinbox.SealError:
                return  # not from our enforcer: nothing we can read
            for _, code, data in frame.events:
                if code == "o":
                    out.write(data.encode())
            out.flush()
            if frame.end:
                reason = frame.reason
                ended.set()

        sub = await nc.subscribe(reply.subject, cb=on_frame)
        how = {"observer": "read-only; Ctrl-C leaves", "peer": "you can type; Ctrl-] leaves",
               "moderator": f"read-only; `ringfence sessions kill {args.sid}` ends it; Ctrl-C leaves"}[args.mode]
        sys.stderr.write(f"joined session {args.sid} of {info.user} on {info.server_hostname} ({how})\n")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, ended.set)

        async def send(data: bytes = b"", leave: bool = False) -> None:
            sealed = base64.b64encode(joinbox.seal(box, data)).decode() if data else ""
            await call(nc, subject, JoinInput(join_id=reply.join_id, data=sealed, leave=leave), dict)

        async def keepalive() -> None:
            while not ended.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), KEEPALIVE)
                if not ended.is_set():
                    await send()

        saved = _typing(loop, send, ended) if args.mode == "peer" else None
        pinger = asyncio.create_task(keepalive())
        try:
            await ended.wait()
        finally:
            pinger.cancel()
            if saved is not None:
                loop.remove_reader(0)
                termios.tcsetattr(0, termios.TCSAFLUSH, saved)
            await sub.unsubscribe()
            with contextlib.suppress(CliError):
                await send(leave=True)
        sys.stderr.write(f"\nleft session {args.sid}{': ' + reason if reason else ''}\n")
        return 0
    finally:
        await nc.close()


def _typing(loop: asyncio.AbstractEventLoop, send, ended: asyncio.Event) -> list | None:
    """Peer mode: our terminal in raw mode, each key to the session (Ctrl-] leaves)."""
    if not os.isatty(0):
        raise CliError("--mode peer needs a terminal to type on")
    saved = termios.tcgetattr(0)
    tty.setraw(0, termios.TCSANOW)

    def on_key() -> None:
        data = os.read(0, 4096)
        if not data or ESCAPE in data:
            ended.set()
            return
        loop.create_task(send(data))

    loop.add_reader(0, on_key)
    return saved


async def run_kill(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        info = await find_session(nc, args.sid)
        body = KillRequest(sid=args.sid, message=args.message or "")
        await call(nc, names.enforcer_subject(info.server_id, "kill"), body, dict)
    finally:
        await nc.close()
    print(f'session "{args.sid}" has been terminated')
    return 0


def _configure_join(p: argparse.ArgumentParser) -> None:
    p.add_argument("sid", help="session id (from `ringfence sessions ls`)")
    p.add_argument("--mode", choices=("observer", "peer", "moderator"), default="observer",
                   help="observer watches; peer also types into the session; moderator watches and may "
                        "end it (each needs a role whose join_sessions allows that mode)")


def _configure_kill(p: argparse.ArgumentParser) -> None:
    p.add_argument("sid", help="session id (from `ringfence sessions ls`)")
    p.add_argument("--message", help="shown to the user before the session ends")


sessions.add_subcommand("join", "watch (or, as a peer, type into) a live session's terminal", _configure_join,
                        run_join)
sessions.add_subcommand("kill", "end a session and every process in it", _configure_kill, run_kill)
