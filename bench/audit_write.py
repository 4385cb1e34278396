"""Audit writer throughput and search latency.

    python -m bench.audit_write [--events N]

(a) The writer alone (no NATS): batches of 256 session.network events through
    decode, dedup, ei, hash chain, append + fsync, index transaction.
(b) End to end: events published to JetStream (acked) while the real audit
    service consumes them; rate from the first publish to the last line in events.log.
(c) Search of 500 events by type over the index built in (b): p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats

from ringfence.contract import api, names
from ringfence.contract.auditlog import daily_files
from ringfence.contract.events import SessionNetwork, encode_event
from ringfence.runtime.audit_publish import publish_event
from services.audit.adapter import BATCH
from services.audit.writer import AuditWriter, Incoming
from tests.support.nats import NatsServer
from tests.support.procs import ServiceProcess, wait_for


def sample(i: int) -> SessionNetwork:
    return SessionNetwork(
        sid=f"session-{i % 50}", user="demo", login="demo", cluster_name="bench", server_id="node-1",
        pid=1000 + i, cgroup_id=10863, program="curl", src_addr="10.0.0.5", dst_addr="10.1.2.3", dst_port=80,
    )


def writer_alone(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        writer = AuditWriter(Path(tmp) / "log")
        writer.start()
        data = [Incoming(encode_event(sample(i))) for i in range(n)]
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            writer.write_batch(data[i : i + BATCH])
        elapsed = time.perf_counter() - t0
        writer.close()
    return n / elapsed


async def _publish(url: str, n: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(0, n, 200):  # up to 200 publishes in flight
        await asyncio.gather(*(publish_event(js, sample(j)) for j in range(i, min(n, i + 200))))
    await nc.close()


async def _search_latency(url: str, rounds: int) -> list[float]:
    nc = await nats.connect(url)
    body = msgspec.json.encode(api.SearchRequest(event_types=["session.network"], limit=500, order="desc"))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await nc.request(names.api_subject(names.AUDIT_API, "search"), body, timeout=10)
        times.append(time.perf_counter() - t0)
    await nc.close()
    return times


def end_to_end(n: int) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        audit = ServiceProcess("audit", server.url, Path(tmp) / "data", env={"RINGFENCE_LOG_LEVEL": "WARNING"})
        try:
            audit.start()
            wait_for(lambda: (Path(tmp) / "data" / "log" / "events.log").exists(), 30, what="audit service")
            log_dir = Path(tmp) / "data" / "log"
            t0 = time.perf_counter()
            asyncio.run(_publish(server.url, n))
            wait_for(lambda: sum(f.read_bytes().count(b"\n") for f in daily_files(log_dir)) >= n,
                     300, interval=0.01, what=f"{n} lines")
            rate = n / (time.perf_counter() - t0)
            return rate, asyncio.run(_search_latency(server.url, 50))
        finally:
            audit.stop()
            server.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_write")
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args(argv)
    print(f"(a) writer alone: {writer_alone(args.events):,.0f} events/s (batches of {BATCH}, fsync per batch)")
    rate, search = end_to_end(args.events)
    print(f"(b) publish -> events.log: {rate:,.0f} events/s over {args.events:,} events")
    search.sort()
    p99 = search[min(len(search) - 1, int(len(search) * 0.99))]
    print(f"(c) search 500 events: p50 {statistics.median(search) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
