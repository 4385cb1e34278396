"""Audit at fleet scale: the writer at 10M events, search over them, disk, end to end, fleet.

    python -m bench audit [--events 10000000] [--e2e-events 200000] [--fleet-nodes 100] [--skip-fleet]

(a) The writer (services/audit/writer.py, the code the service runs) fed N events in
    batches as the consumer hands them on, with stream timestamps spread over 5 days
    (bench/audit_data.py: 1,000 users, 50 sessions open at once, mostly kernel events).
    Rate over the first and the last 1M events (only write_batch is timed, not making them).
(b) Disk: the daily files against the index that points into them.
(c) Search over those N events through the real audit service and NATS, as
    `ringfence events search` asks: one user over a day, one sid, one type over an hour,
    a user and a type together, the newest 500, and the next page of a user's day
    (--start-key). p50 and p99 over random picks.
(d) End to end on top of the N events: the real audit service consuming what a
    publisher puts on the stream, one event per message and in batches of 1,000
    (ringfence.audit.batch, as the enforcer publishes kernel events); events/s from
    the first publish until the last is in events.log, checked for loss and repeats.
(e) The fleet figure: 100 simulated enforcers emitting denials (bench/fleet.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats

from bench.audit_data import DAY_MS, SERVER_ID, Fleet, Generator
from ringfence.contract import api, names
from ringfence.contract.auditlog import daily_files
from ringfence.contract.batches import COUNT_HEADER, batch_msg_id, encode_batch
from ringfence.contract.events import SessionNetwork, encode_event
from ringfence.runtime.audit_publish import MSG_ID_HEADER, publish_encoded
from services.audit.index import INDEX_FILE, WriteIndex
from services.audit.logfiles import disk_use
from services.audit.writer import AuditWriter
from tests.support.nats import NatsServer
from tests.support.procs import ServiceProcess, wait_for

WRITE_BATCH = 4096  # events per write_batch: what one fetch of batch messages holds (adapter.TARGET_EVENTS/2)
WINDOW = 1_000_000
SEARCH_ROUNDS = 60
TARGET_RATE = 20_000
TARGET_P50_MS = 20.0


def write(directory: Path, fleet: Fleet) -> list[tuple[int, float, float]]:
    """Write every event of `fleet`; (events written, write seconds, CPU seconds) at each 1M.
    CPU seconds are this process's: on a machine others share, they show what the writer
    would do with a core of its own."""
    gen = Generator(fleet)
    writer = AuditWriter(directory)
    writer.start()
    marks = [(0, 0.0, 0.0)]
    spent = cpu = 0.0
    for first in range(0, fleet.total, WRITE_BATCH):
        batch = gen.batch(first, WRITE_BATCH)
        t0, c0 = time.perf_counter(), time.process_time()
        writer.write_batch(batch)
        spent += time.perf_counter() - t0
        cpu += time.process_time() - c0
        done = first + len(batch)
        if done % WINDOW < WRITE_BATCH or done == fleet.total:
            marks.append((done, spent, cpu))
            print(f"  {done:>11,} events, {done / spent:,.0f}/s so far ({done / cpu:,.0f} per CPU second)",
                  file=sys.stderr, flush=True)
    writer.close()
    return marks


def rate(marks: list[tuple[int, float, float]], first: bool, cpu: bool = False) -> float:
    a, b = (marks[0], marks[1]) if first else (marks[-2], marks[-1])
    return (b[0] - a[0]) / (b[2 if cpu else 1] - a[2 if cpu else 1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def _search(nc, req: api.SearchRequest) -> tuple[float, api.SearchResult]:
    t0 = time.perf_counter()
    msg = await nc.request(names.api_subject(names.AUDIT_API, "search"), msgspec.json.encode(req), timeout=30)
    elapsed = time.perf_counter() - t0
    reply = msgspec.json.decode(msg.data, type=api.ApiReply)
    if not reply.ok:
        raise RuntimeError(reply.error)
    return elapsed, msgspec.json.decode(reply.result, type=api.SearchResult)


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def searches(url: str, fleet: Fleet) -> dict[str, tuple[list[float], int]]:
    """{query: (seconds of each round, events in the last answer)}."""
    rng = random.Random()  # other picks each run: what an earlier run read may still be in the page cache
    nc = await nats.connect(url)
    found: dict[str, tuple[list[float], int]] = {}
    days = fleet.days
    last_ms = fleet.time_ms(fleet.total - 1)

    def user() -> str:
        return f"user{rng.randrange(fleet.users):04d}@example.com"

    def day_start() -> int:
        return fleet.start_ms + rng.randrange(days) * DAY_MS

    queries = {
        "one user over a day": lambda: api.SearchRequest(user=user(), start=_iso(d := day_start()),
                                                         end=_iso(d + DAY_MS)),
        "one sid": lambda: api.SearchRequest(sid=fleet.sid_of(rng.randrange(fleet.sessions()))),
        "one type over an hour": lambda: api.SearchRequest(
            event_types=["session.command"], start=_iso(h := fleet.start_ms + rng.randrange(days * 24) * 3_600_000),
            end=_iso(h + 3_600_000)),
        "a user and a type": lambda: api.SearchRequest(user=user(), event_types=["session.disk"]),
        "newest 500": lambda: api.SearchRequest(order="desc", start=_iso(fleet.start_ms), end=_iso(last_ms + 1)),
    }
    try:
        for name, make in queries.items():
            times, size = [], 0
            for _ in range(SEARCH_ROUNDS):
                elapsed, result = await _search(nc, make())
                times.append(elapsed)
                size = len(result.events)
            found[name] = (times, size)
        times, size = [], 0
        for _ in range(SEARCH_ROUNDS):  # page 2 of a user's day, as `--start-key` asks for it
            d = day_start()
            first = api.SearchRequest(user=user(), start=_iso(d), end=_iso(d + DAY_MS), limit=100)
            _, page = await _search(nc, first)
            first.start_key = page.next_key
            elapsed, result = await _search(nc, first)
            times.append(elapsed)
            size = len(result.events)
        found["next page (--start-key)"] = (times, size)
    finally:
        await nc.close()
    return found


async def _publish(url: str, lines: list[bytes], per_message: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        if per_message == 1:
            for i in range(0, len(lines), 500):
                await publish_encoded(js, lines[i : i + 500])
            return
        pending = []
        for i in range(0, len(lines), per_message):
            chunk = lines[i : i + per_message]
            pending.append(await js.publish_async(
                names.audit_batch_subject(SERVER_ID), encode_batch(chunk),
                headers={COUNT_HEADER: str(len(chunk)), MSG_ID_HEADER: batch_msg_id(chunk)}))
            if len(pending) >= 32:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await nc.close()


def _lines_of(directory: Path, since: Path | None, offset: int) -> int:
    """Newlines written after (`since`, `offset`)."""
    total = 0
    for f in daily_files(directory):
        if since is not None and f.name < since.name:
            continue
        data = f.read_bytes()
        total += data.count(b"\n", offset if since is not None and f.name == since.name else 0)
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def end_to_end(url: str, directory: Path, n: int, per_message: int, pid: int) -> tuple[float, float, int, int]:
    """(events/s, events per CPU second of the audit service, lost, written twice) for `n`
    new events published `per_message` per message."""
    marker = f"e2e-{per_message}-{time.time_ns()}"
    events = [SessionNetwork(user="e2e", sid=marker, program="scan", dst_addr="10.9.8.7", dst_port=i % 65536,
                             server_id=SERVER_ID) for i in range(n)]
    lines = [encode_event(e) for e in events]
    last = daily_files(directory)[-1]
    offset = last.stat().st_size
    t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
    asyncio.run(_publish(url, lines, per_message))
    # Anchors of a new day count as lines too: wait for at least n, then count exactly.
    wait_for(lambda: _lines_of(directory, last, offset) >= n, 600, interval=0.02, what=f"{n} lines")
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    written = []
    for f in daily_files(directory):
        if f.name < last.name:
            continue
        data = f.read_bytes()[offset if f.name == last.name else 0:]
        written += [msgspec.json.decode(line) for line in data.splitlines() if marker.encode() in line]
    uids = {e["uid"] for e in written}
    return n / elapsed, n / cpu, n - len(uids & {e.uid for e in events}), len(written) - len(uids)


def run(args: argparse.Namespace) -> int:
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ringfence-bench-audit-"))
    data = work / "data"
    log_dir = data / "log"
    fleet = Fleet(args.events)
    failed = False
    try:
        if args.reuse:  # a log this benchmark wrote before (--dir, --keep): search and end to end only
            marks = []
        else:
            print(f"(a) writing {args.events:,} events through the audit writer into {log_dir}", file=sys.stderr)
            marks = write(log_dir, fleet)
        use = disk_use(log_dir, None)
        index = WriteIndex(log_dir / INDEX_FILE)
        indexed = index.count()
        index.close()

        server = NatsServer(work / "nats").start()
        audit = ServiceProcess("audit", server.url, data, env={"RINGFENCE_LOG_LEVEL": "INFO"})
        audit.log.unlink(missing_ok=True)  # its "ready" is looked for in this file
        try:
            audit.start().wait_ready(300)
            found = asyncio.run(searches(server.url, fleet))
            assert audit.proc is not None
            single = end_to_end(server.url, log_dir, args.e2e_events, 1, audit.proc.pid)
            batched = end_to_end(server.url, log_dir, args.e2e_events, 1000, audit.proc.pid)
        finally:
            audit.stop()
            server.stop()

        print()
        print(f"audit at {indexed:,} events                          measured        target")
        for label, first_window in (("first 1M events", True), (f"last 1M events (at {indexed / 1e6:.0f}M)", False)):
            if not marks:
                break
            r, c = rate(marks, first_window), rate(marks, first_window, cpu=True)
            print(f"(a) writer, {label:<34}{r:>10,.0f}/s   >= {TARGET_RATE:,}/s   ({c:,.0f} per CPU second)")
            failed |= not first_window and r < TARGET_RATE
        print(f"(b) daily files                               {use.log / 1e6:>10,.0f} MB  "
              f"({use.log / indexed:.0f} B/event)")
        print(f"(b) index                                     {use.index / 1e6:>10,.0f} MB  ({use.index / indexed:.0f} "
              f"B/event) = {use.index / use.log:.2f} x the log   < 1 x")
        for name, (times, size) in found.items():
            p50, p99 = statistics.median(times) * 1000, percentile(times, 0.99) * 1000
            print(f"(c) search: {name:<28} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({size} events)  p50 <= 20 ms")
            failed |= p50 > TARGET_P50_MS
        for label, (r, c, lost, twice) in (("one event per message", single), ("batches of 1,000", batched)):
            print(f"(d) publish -> events.log, {label:<22} {r:>8,.0f}/s   >= {TARGET_RATE:,}/s   "
                  f"({c:,.0f} per CPU second of the audit service; lost {lost}, written twice {twice})")
            failed |= lost > 0 or twice > 0
        failed |= use.index >= use.log
        sys.stdout.flush()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(kept {work})")
    if not args.skip_fleet:
        from bench import fleet as fleet_bench

        print("(e) fleet: 100 simulated enforcers", flush=True)
        failed |= bool(fleet_bench.main(["--nodes", str(args.fleet_nodes), "--updates", "1"]))
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--e2e-events", type=int, default=200_000)
    parser.add_argument("--fleet-nodes", type=int, default=100)
    parser.add_argument("--skip-fleet", action="store_true")
    parser.add_argument("--dir", help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the log, index and NATS store")
    parser.add_argument("--reuse", action="store_true", help="use the log already in --dir (skips (a))")
    return run(parser.parse_args(argv))
