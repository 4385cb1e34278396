"""`ringfence sessions join SID` and `ringfence sessions kill SID`.

Both find the session's node in the fleet-wide sessions bucket and talk to
that node's enforcer. join streams the session's terminal output read-only
(live chunks on core NATS) and is recorded as session.join / session.leave.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import signal
import sys

import msgspec

from ..contract import names, recording
from ..contract.api import JoinRequest, KillRequest, SessionInfo
from . import sessions
from .client import CliError, call, open_client


async def find_session(nc, sid: str) -> SessionInfo:
    for info in await sessions.read_sessions(nc):
        if info.sid == sid:
            return info
    raise CliError(f'no active session "{sid}" (see `ringfence sessions ls`)')


def participant() -> str:
    """Who is joining, for the audit trail."""
    return os.environ.get("RINGFENCE_USER") or getpass.getuser()


async def run_join(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        info = await find_session(nc, args.sid)
        if not info.interactive:
            raise CliError(f'session "{args.sid}" is not interactive; there is no terminal to join')
        ended = asyncio.Event()
        out = sys.stdout.buffer

        async def on_chunk(msg) -> None:
            try:
                chunk = recording.decode(msg.data)
            except msgspec.DecodeError:
                return
            for _, code, data in chunk.events:
                if code == "o":
                    out.write(data.encode())
            out.flush()
            if chunk.end:
                ended.set()

        sub = await nc.subscribe(names.live_subject(info.server_id, args.sid), cb=on_chunk)
        body = JoinRequest(sid=args.sid, user=participant())
        await call(nc, names.enforcer_subject(info.server_id, "join"), body, dict)
        sys.stderr.write(f"joined session {args.sid} of {info.user} on {info.server_hostname} "
                         f"(read-only; Ctrl-C leaves)\n")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, ended.set)
        try:
            await ended.wait()
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(CliError):
                await call(nc, names.enforcer_subject(info.server_id, "leave"), body, dict)
        sys.stderr.write(f"\nleft session {args.sid}\n")
        return 0
    finally:
        await nc.close()


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


def _configure_kill(p: argparse.ArgumentParser) -> None:
    p.add_argument("sid", help="session id (from `ringfence sessions ls`)")
    p.add_argument("--message", help="shown to the user before the session ends")


sessions.add_subcommand("join", "watch a live session's terminal, read-only", _configure_join, run_join)
sessions.add_subcommand("kill", "end a session and every process in it", _configure_kill, run_kill)
