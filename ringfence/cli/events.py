"""`ringfence events search|tail|verify`: the audit trail, from the index, live, and on disk."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import shlex
import sqlite3
import sys
from pathlib import Path

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ..contract import names
from ..contract.api import DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT, SearchRequest, SearchResult
from ..contract.auditlog import (
    daily_file_name,
    daily_files,
    is_daily_file,
    last_line_hash,
    log_dir,
    unseal,
    verify_files,
)
from ..contract.batches import BatchError, event_type, events_in
from ..contract.events import EVENT_TYPES, AuditEvent
from ..contract.streams import MAX_EVENT_BYTES
from ..durations import parse_duration
from ..runtime.pull_consumer import Delivered, PullConsumer, Settle
from .client import CliError, call, config_from, open_client

COMMON_FIELDS = {*AuditEvent.__struct_fields__, "event", "hash"}
TAIL_DURABLE_PREFIX = "tail-"  # `events tail --durable NAME` reads consumer tail-NAME
TAIL_BATCH = 256
TAIL_ACK_WAIT = 30.0


# --- options ----------------------------------------------------------------------------------


def event_types(values: list[str] | None) -> list[str]:
    """--type given several times and/or as a comma list; every name must be an event type."""
    types: list[str] = []
    for value in values or []:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in EVENT_TYPES:
                raise CliError(f'--type: "{name}" is not an event type; known: {", ".join(sorted(EVENT_TYPES))}')
            if name not in types:
                types.append(name)
    return types


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_time(flag: str, text: str) -> str:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise CliError(f'{flag}: "{text}" is not an RFC 3339 time with a UTC offset (e.g. 2021-07-22T22:24:14Z)')
    return text


def search_request(args: argparse.Namespace, now: dt.datetime | None = None) -> SearchRequest:
    if args.since and args.from_:
        raise CliError("use only one of --since and --from")
    start = ""
    if args.since:
        try:
            seconds = parse_duration(args.since)
        except ValueError as exc:
            raise CliError(f"--since: {exc}") from None
        start = rfc3339((now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds))
    elif args.from_:
        start = check_time("--from", args.from_)
    return SearchRequest(
        start=start,
        end=check_time("--to", args.to) if args.to else "",
        event_types=event_types(args.type),
        user=args.user or "",
        sid=args.sid or "",
        limit=args.limit,
        order=args.order,
        start_key=args.start_key or "",
    )


# --- text output ---------------------------------------------------------------------------------

_OPERATIONS = {0: "connect", 1: "send"}
_ACTIONS = {0: "observed", 1: "denied"}


def _host_port(addr: str, port: object) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _compact(value: object) -> str:
    if isinstance(value, str):
        return shlex.quote(value) if value else '""'
    return json.dumps(value, separators=(",", ":"))


def summary(ev: dict) -> str:
    """The fields worth a glance, per event type; other types list their non-empty fields."""
    kind = ev.get("event")
    if kind == "session.network":
        op = _OPERATIONS.get(ev.get("operation"), f"operation={ev.get('operation')}")
        action = _ACTIONS.get(ev.get("action"), f"action={ev.get('action')}")
        return f"{ev.get('program', '')} {_host_port(ev.get('dst_addr', ''), ev.get('dst_port', ''))} {op} {action}"
    if kind == "session.command":
        argv = ev.get("argv") or []
        what = shlex.join(argv) if argv else ev.get("path", "")
        return f"{ev.get('program', '')}: {what} rc={ev.get('return_code', 0)}"
    if kind == "session.disk":
        flags = ev.get("flags", 0)
        return f"{ev.get('program', '')}: {ev.get('path', '')} flags={flags:#o} rc={ev.get('return_code', 0)}"
    parts = [f"{k}={_compact(v)}" for k, v in ev.items() if k not in COMMON_FIELDS and v not in ("", 0, [], {}, False)]
    return " ".join(parts)


def format_text(ev: dict) -> str:
    sid = (ev.get("sid") or "-")[:8]  # a UUID's first group is enough to tell sessions apart
    user = ev.get("user") or "-"
    head = f"{ev.get('time', '')}  {ev.get('event', ''):<17} {ev.get('code', ''):<7} {user:<12} {sid:<8}"
    return f"{head}  {summary(ev)}".rstrip()


def print_event(raw: bytes, fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(raw.decode("utf-8", errors="replace").rstrip("\n") + "\n")
    else:
        try:
            ev = json.loads(raw)
        except ValueError:
            print(f"(not a JSON event: {raw[:80]!r})", file=sys.stderr)
            return
        if not isinstance(ev, dict):
            print(f"(not a JSON object: {raw[:80]!r})", file=sys.stderr)
            return
        sys.stdout.write(format_text(ev) + "\n")
    sys.stdout.flush()


# --- search ---------------------------------------------------------------------------------------


async def run_search(args: argparse.Namespace) -> int:
    request = search_request(args)
    subject = names.api_subject(names.AUDIT_API, "search")
    nc = await open_client(args)
    more = ""
    try:
        remaining = request.limit
        while True:
            result = await call(nc, subject, request, SearchResult)
            for raw in result.events:
                print_event(bytes(raw), args.format)
            remaining -= len(result.events)
            if not result.next_key:
                break
            if remaining <= 0:
                more = result.next_key
                break
            # The service cut the page short (reply size): fetch the rest of --limit.
            request.limit = remaining
            request.start_key = result.next_key
    finally:
        await nc.close()
    if more:
        print(f"(more events match; showing the first {args.limit}: raise --limit, narrow the search, "
              f"or see the next page with --start-key {more})", file=sys.stderr)
    return 0


# --- tail -------------------------------------------------------------------------------------------


def print_message(subject: str, data: bytes, headers: dict[str, str] | None, types: set[str], fmt: str) -> None:
    """Every event a stream message carries (a batch holds many), those of `types` only when given."""
    try:
        lines = events_in(subject, headers, data)
    except BatchError as exc:
        print(f"(a malformed batch on {subject}: {exc})", file=sys.stderr)
        return
    for line in lines:
        if types and event_type(line) not in types:
            continue
        print_event(line, fmt)




_DURABLE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,48}$")


def durable_consumer_name(name: str) -> str:
    if not _DURABLE_NAME.match(name):
        raise CliError(f'--durable: "{name}" is not a consumer name: use 1 to 48 letters, digits, "-" or "_"')
    return f"{TAIL_DURABLE_PREFIX}{name}"


def tail_consumer_config(name: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.ALL,  # one ack per batch, after its events are printed
        ack_wait=TAIL_ACK_WAIT,
        deliver_policy=DeliverPolicy.NEW,  # the first run starts with new events; later runs where it stopped
        max_ack_pending=TAIL_BATCH * 4,
        max_deliver=-1,
    )


async def run_tail(args: argparse.Namespace) -> int:
    types = set(event_types(args.type))
    durable = durable_consumer_name(args.durable) if args.durable else ""
    nc = await open_client(args)
    try:
        js = nc.jetstream()
        try:
            if durable:
                await _tail_durable(js, durable, types, args.format)
            else:
                # Ordered consumer: ephemeral, in stream order, new messages only.
                sub = await js.subscribe(names.AUDIT_SUBJECTS, stream=names.AUDIT_STREAM, ordered_consumer=True,
                                         deliver_policy=DeliverPolicy.NEW)
                print("following new audit events (Ctrl-C to stop)", file=sys.stderr, flush=True)
                async for msg in sub.messages:
                    print_message(msg.subject, msg.data, msg.headers, types, args.format)
        except NotFoundError:
            raise CliError(f"the audit stream {names.AUDIT_STREAM} does not exist yet; start the services "
                           "(`ringfence up`)") from None
    finally:
        await nc.close()
    return 0


async def _tail_durable(js, durable: str, types: set[str], fmt: str) -> None:
    """Print events from durable consumer `durable`, acknowledging each batch once it is on
    stdout: a run that is killed leaves its unacknowledged events to the next run (at least
    once; the uid tells a repeat)."""

    async def handle(batch: list[Delivered]) -> Settle:
        for d in batch:
            print_message(d.subject, d.data, d.headers, types, fmt)
        sys.stdout.flush()
        return Settle.all_of(batch)

    consumer = PullConsumer(js, stream=names.AUDIT_STREAM, subjects=names.AUDIT_SUBJECTS,
                            config=tail_consumer_config(durable), batch=TAIL_BATCH, handle=handle, in_order=True,
                            label=durable)
    await consumer.start()
    print(f"following audit events with durable consumer {durable} (Ctrl-C to stop; the next run with "
          "this name resumes where it stopped)", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()  # until Ctrl-C
    finally:
        await consumer.stop()


# --- verify -----------------------------------------------------------------------------------------


def _predecessor_hash(first: Path) -> str | None:
    """The hash the first given file chains to: the last line of the day before it
    (None when there is none: a first file, or the days before it were removed)."""
    if not is_daily_file(first.name):
        return None
    earlier = [p for p in daily_files(first.parent) if p.name < first.name]
    for p in reversed(earlier):
        h = last_line_hash(p)
        if h:
            return h
    return None


def _check_index_tail(directory: Path) -> str | None:
    """The chain cannot show lines cut from the end; the writer's index remembers where the
    last line it wrote ends and its hash. Returns a problem, or None (also when there is
    no index to ask)."""
    path = directory / "index.sqlite"
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT loc, hash FROM state WHERE id = 0").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    loc, recorded = row
    day, end = loc >> 40, loc & ((1 << 40) - 1)  # services/audit/index.py: day << 40 | byte offset
    file = daily_file_name(dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=day))
    start = max(0, end - MAX_EVENT_BYTES - 4096)  # a line is an event of at most 1 MiB, sealed
    try:
        with open(directory / file, "rb") as f:
            f.seek(start)
            head = f.read(end - start)
    except OSError:
        head = b""
    try:
        ok = head.endswith(b"\n") and unseal(head[:-1].rsplit(b"\n", 1)[-1])[1] == recorded
    except ValueError:
        ok = False
    if not ok:
        return (f"{directory / file}: the index records a line ending at byte {end} that the file no longer "
                "holds: lines were removed from the end of the log")
    return None


def run_verify(args: argparse.Namespace) -> int:
    directory: Path | None = None
    if args.files:
        paths = [Path(f).resolve() for f in args.files]  # events.log is a symlink
        for p in paths:
            if not p.is_file():
                raise CliError(f"{p}: no such file")
        prev = _predecessor_hash(paths[0])
    else:
        directory = log_dir(config_from(args).data_dir)
        paths = daily_files(directory)
        if not paths:
            raise CliError(f"no audit log files in {directory}")
        prev = None
    result = verify_files(paths, prev)
    if result.broken:
        b = result.broken
        raise CliError(f"{b.path} line {b.line_no}: {b.reason} ({result.verified} events before it verified)")
    if directory is not None and (problem := _check_index_tail(directory)):
        raise CliError(problem)
    if result.incomplete_tail:
        print(f"(the last line of {result.incomplete_tail} is still being written; not checked)", file=sys.stderr)
    if result.starts_at is not None:
        print(f"(the chain starts at the anchor of {result.starts_at.file}: the days before it are not here, "
              "e.g. removed by audit.retention)", file=sys.stderr)
    print(f"OK: {result.verified} events verified")
    return 0


# --- parser -------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "events",
        help="search, follow and verify the audit log",
        description="The audit trail: search the index, follow live events, verify the log's hash chain.",
    )
    esub = p.add_subparsers(dest="events_command", metavar="SUBCOMMAND", required=True)
    type_help = "event type, e.g. session.network (repeat or comma-separate for several)"
    fmt_help = "text: one summary line per event; json: each event as stored, one per line (for a SIEM)"

    s = esub.add_parser(
        "search",
        parents=[common],
        help="search written events",
        description="Search the audit index (oldest first unless --order desc).",
    )
    s.add_argument("--type", action="append", metavar="T", help=type_help)
    s.add_argument("--since", metavar="DURATION", help="events of the last DURATION, e.g. 1h or 15m")
    s.add_argument("--from", dest="from_", metavar="TS", help="RFC 3339 start time (inclusive)")
    s.add_argument("--to", metavar="TS", help="RFC 3339 end time (exclusive)")
    s.add_argument("--user", help="only this user's events")
    s.add_argument("--sid", help="only this session's events")
    s.add_argument("--limit", type=int, default=DEFAULT_SEARCH_LIMIT,
                   help=f"at most this many events (default {DEFAULT_SEARCH_LIMIT}, at most {MAX_SEARCH_LIMIT})")
    s.add_argument("--order", choices=["asc", "desc"], default="asc")
    s.add_argument("--start-key", metavar="KEY",
                   help="continue after the last event of an earlier search (the key it printed)")
    s.add_argument("--format", choices=["text", "json"], default="text", help=fmt_help)
    s.set_defaults(func=run_search)

    t = esub.add_parser(
        "tail",
        parents=[common],
        help="follow new events as they are published",
        description="Print new audit events as they are published, until Ctrl-C. Events appear as "
        "published: ei and hash are assigned when the audit service writes them. With --durable NAME "
        "the position is kept by NATS: the next run with that NAME resumes where this one stopped (at "
        "least once: events printed just before a kill come again; their uid tells).",
    )
    t.add_argument("--type", action="append", metavar="T", help=type_help)
    t.add_argument("--durable", metavar="NAME",
                   help="resume where the last run with this NAME stopped (one reader per NAME)")
    t.add_argument("--format", choices=["text", "json"], default="text", help=fmt_help)
    t.set_defaults(func=run_tail)

    v = esub.add_parser(
        "verify",
        parents=[common],
        help="check the log's hash chain",
        description="Check the hash chain of the given files (default: every daily file under "
        "<data_dir>/log, in order). Prints OK or the first line that breaks the chain and exits 1.",
    )
    v.add_argument("files", nargs="*", metavar="FILE", help="daily log files, oldest first")
    v.set_defaults(func=run_verify)
