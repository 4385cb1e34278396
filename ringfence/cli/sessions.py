"""`ringfence sessions ls [--ended]` and `ringfence sessions play SID` (alias: `ringfence play SID`).

`sessions` is a command group. To add a subcommand (e.g. `sessions join`,
`sessions kill`), either add an entry to SUBCOMMANDS below (the marked place),
or, from another module, call before the parser is built:

    from . import sessions
    sessions.add_subcommand("kill", "terminate a session", configure, run_kill)

where `configure(parser)` adds the subcommand's arguments and `run_kill(args)`
runs it (it may be async; return the exit code). The subcommand parser already
has the connection options (--config, --nats-url, --data-dir). A module that
calls add_subcommand must be imported before main.build_parser() runs, e.g. by
importing it from this module's bottom or from commands.py.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.js.errors import BucketNotFoundError

from ..contract import names
from ..contract.api import SessionInfo
from ..contract.recording import (
    MAX_LIST_LIMIT,
    RecordingGetRequest,
    RecordingGetResult,
    RecordingListRequest,
    RecordingListResult,
    is_valid_sid,
    parse_cast,
)
from ..durations import format_duration
from ..runtime import kv_read
from .client import CliError, call, open_client

KV_READ_TIMEOUT = 5.0  # seconds to read the sessions bucket


# --- subcommand registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    func: Callable[[argparse.Namespace], Any]


SUBCOMMANDS: list[Subcommand] = []


Configure = Callable[[argparse.ArgumentParser], None]


def add_subcommand(name: str, help: str, configure: Configure, func: Callable[[argparse.Namespace], Any]) -> None:
    """Add `ringfence sessions <name>`; see the module docstring."""
    if any(s.name == name for s in SUBCOMMANDS):
        raise ValueError(f"sessions {name} is already registered")
    SUBCOMMANDS.append(Subcommand(name, help, configure, func))


# --- formatting ------------------------------------------------------------------------------------


def parse_time(text: str) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else None


def short_time(text: str) -> str:
    """RFC 3339 in UTC to the second, or the text as it is when it is not a time."""
    when = parse_time(text)
    if when is None:
        return text or "-"
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def idle(last_active: str, now: dt.datetime) -> str:
    """now - last_active as 1m3s; "-" when unknown."""
    when = parse_time(last_active)
    if when is None:
        return "-"
    return duration((now - when).total_seconds())


def duration(seconds: float) -> str:
    """Whole seconds, Go style: 0s, 45s, 1m3s, 2h0m5s."""
    whole = max(0, round(seconds))
    return format_duration(whole) if whole else "0s"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


# --- sessions ls ------------------------------------------------------------------------------------


async def read_sessions(nc) -> list[SessionInfo]:
    """Every entry of the sessions bucket (key = sid), oldest first."""
    js = nc.jetstream()
    try:
        kv = await kv_read.open_bucket(js, names.SESSIONS_BUCKET)
    except BucketNotFoundError:
        return []  # nothing has created it yet: no sessions
    # A checked snapshot: a plain watch can report "no more entries" before the ones it
    # is about to deliver (nats-py), and `sessions ls` would then show too few.
    try:
        entries = await kv_read.snapshot(js, kv, deadline=KV_READ_TIMEOUT)
    except kv_read.StaleSnapshotError as exc:
        raise CliError(f"reading the {names.SESSIONS_BUCKET} bucket: {exc}") from None
    found: list[SessionInfo] = []
    for key, entry in entries.items():
        if not entry.value:
            continue
        try:
            found.append(msgspec.json.decode(entry.value, type=SessionInfo))
        except msgspec.DecodeError as exc:
            print(f"warning: {names.SESSIONS_BUCKET} key {key}: not a session ({exc})", file=sys.stderr)
    found.sort(key=lambda s: (parse_time(s.started) or dt.datetime.max.replace(tzinfo=dt.UTC), s.sid))
    return found


def print_sessions(found: list[SessionInfo], fmt: str, now: dt.datetime) -> None:
    if fmt == "json":
        print(json.dumps([msgspec.to_builtins(s) for s in found], indent=2))
        return
    rows = [("SID", "USER", "LOGIN", "NODE", "CLIENT", "STARTED", "IDLE")]
    for s in found:
        rows.append((s.sid, s.user or "-", s.login or "-", s.server_hostname or "-", s.addr_remote or "-",
                     short_time(s.started), idle(s.last_active, now)))
    print_table(rows)


async def list_recordings(nc, user: str, limit: int):
    subject = names.api_subject(names.AUDIT_API, "recordings")
    result = await call(nc, subject, RecordingListRequest(user=user, limit=limit), RecordingListResult)
    return result.recordings


def print_recordings(found, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([msgspec.to_builtins(r) for r in found], indent=2))
        return
    rows = [("SID", "USER", "LOGIN", "NODE", "STARTED", "DURATION")]
    for r in found:
        # A recording without its end chunk (session running, or its node went away) is marked.
        length = duration(r.duration) if r.ended else f"{duration(r.duration)} (open)"
        rows.append((r.sid, r.user or "-", r.login or "-", r.server_hostname or "-", short_time(r.started), length))
    print_table(rows)


async def run_ls(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_LIST_LIMIT:
        raise CliError(f"--limit: {args.limit} is out of range (1 to {MAX_LIST_LIMIT})")
    if args.user and not args.ended:
        raise CliError("--user applies to --ended only")
    nc = await open_client(args)
    try:
        if args.ended:
            print_recordings(await list_recordings(nc, args.user or "", args.limit), args.format)
        else:
            print_sessions(await read_sessions(nc), args.format, dt.datetime.now(dt.UTC))
    finally:
        await nc.close()
    return 0


def configure_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ended", action="store_true",
                   help="list stored recordings (newest first) instead of active sessions")
    p.add_argument("--user", help="with --ended: only this user's recordings")
    p.add_argument("--limit", type=int, default=100, help=f"with --ended: at most this many (max {MAX_LIST_LIMIT})")
    p.add_argument("--format", choices=["text", "json"], default="text")


# Subcommands of `ringfence sessions`, in help order. Add new ones here (or with add_subcommand).
SUBCOMMANDS.append(Subcommand("ls", "list active sessions across the fleet, or stored recordings", configure_ls,
                              run_ls))


# --- play ---------------------------------------------------------------------------------------------


async def fetch_recording(nc, sid: str) -> tuple[str, bool]:
    """The whole .cast text, following next_offset; complete is False when the recording has no end yet."""
    subject = names.api_subject(names.AUDIT_API, "recording")
    parts: list[str] = []
    offset = 0
    while True:
        page = await call(nc, subject, RecordingGetRequest(sid=sid, offset=offset), RecordingGetResult)
        parts.append(page.data)
        if page.complete:
            return "".join(parts), True
        if page.next_offset <= offset:  # the end of what is stored of a recording still being written
            return "".join(parts), False
        offset = page.next_offset


def schedule(events, speed: float, max_idle: float | None) -> list[tuple[float, str]]:
    """(seconds after the start of playback, data) of the output events."""
    out: list[tuple[float, str]] = []
    at = 0.0
    prev = 0.0
    for t, code, data in events:
        gap = max(0.0, t - prev)
        prev = max(prev, t)
        if max_idle is not None:
            gap = min(gap, max_idle)
        at += gap
        if code == "o":
            out.append((at / speed, data))
    return out


def replay(plan: list[tuple[float, str]], out=None, clock=time.monotonic, sleep=time.sleep) -> None:
    out = out or sys.stdout.buffer
    start = clock()
    for at, data in plan:
        wait = start + at - clock()  # against the start: no drift from many short sleeps
        if wait > 0:
            sleep(wait)
        out.write(data.encode("utf-8", errors="replace"))
        out.flush()


async def _fetch(args: argparse.Namespace) -> tuple[str, bool]:
    nc = await open_client(args)
    try:
        return await fetch_recording(nc, args.sid)
    finally:
        await nc.close()


def run_play(args: argparse.Namespace) -> int:
    if not is_valid_sid(args.sid):
        raise CliError(f'"{args.sid}" is not a session id')
    if not args.speed > 0:
        raise CliError(f"--speed: {args.speed} must be more than 0")
    if args.max_idle is not None and not args.max_idle > 0:
        raise CliError(f"--max-idle: {args.max_idle} must be more than 0")
    text, complete = asyncio.run(_fetch(args))
    # Played outside the event loop, so Ctrl-C stops it at once.
    try:
        if args.format == "cast":
            sys.stdout.buffer.write(text.encode("utf-8", errors="replace"))
            sys.stdout.buffer.flush()
        else:
            try:
                _header, events = parse_cast(text)
            except ValueError as exc:
                raise CliError(f"the recording of {args.sid} cannot be played: {exc}") from None
            replay(schedule(events, args.speed, args.max_idle))
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not complete:
        print(f"(the recording of {args.sid} has no end yet: the session is running or its node stopped "
              "recording; this is what is stored so far)", file=sys.stderr)
    return 0


PLAY_HELP = ("Replay a session recording to stdout at its own pace (divided by --speed). "
             "--format cast writes the asciicast v2 file instead, for `asciinema play`.")


def configure_play(p: argparse.ArgumentParser) -> None:
    p.description = PLAY_HELP
    p.add_argument("sid", metavar="SID", help="session id (see `ringfence sessions ls --ended`)")
    p.add_argument("--speed", type=float, default=1.0, help="play N times faster (default 1)")
    p.add_argument("--max-idle", type=float, metavar="SECONDS", help="shorten longer pauses to SECONDS")
    p.add_argument("--format", choices=["text", "cast"], default="text",
                   help="text: replay the output; cast: print the raw asciicast v2 recording")


SUBCOMMANDS.append(Subcommand("play", "replay a recorded session", configure_play, run_play))


# --- parser ------------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sessions",
        help="active sessions and their recordings",
        description="Active sessions across the fleet (`sessions ls`), stored recordings (`sessions ls --ended`, "
        "`sessions play SID`), watching and ending a live session (`sessions join`, `sessions kill`).",
    )
    ssub = p.add_subparsers(dest="sessions_command", metavar="SUBCOMMAND", required=True)
    for s in SUBCOMMANDS:
        sp = ssub.add_parser(s.name, parents=[common], help=s.help, description=s.help[:1].upper() + s.help[1:] + ".")
        s.configure(sp)
        sp.set_defaults(func=s.func)

    # `ringfence play` is the same command as `sessions play`, kept for those who learnt it first.
    play = sub.add_parser("play", parents=[common], help="replay a recorded session (same as `sessions play`)")
    configure_play(play)
    play.set_defaults(func=run_play)
