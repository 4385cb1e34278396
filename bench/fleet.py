"""A simulated fleet: 100 enforcers on one host (simulated kernel: no BPF, no cgroups).

    python -m bench fleet [--nodes 100] [--updates 20] [--events-per-node 1000]

Measures, with the real policy, locks and audit services and JetStream:
(a) policy propagation: from `create -f` returning until each enforcer has
    applied the new network_restrictions (p50, p99 over nodes x updates);
(b) lock propagation: from `lock` returning until each enforcer's lock view
    holds it (p50, p99);
(c) audit throughput: every enforcer emits N denial events at once; events per
    second from the first request until the last one is in events.log, and a
    check that none is lost or written twice.
Each enforcer reports the wall-clock millisecond it applied a change in its
$SRV.STATS counters, so the delays are measured on the enforcers themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats

from ringfence.contract import api, names
from ringfence.contract.auditlog import daily_files, event_lines
from ringfence.contract.resources import CIDRRule, LockTarget, NetworkRestrictions, NetworkRestrictionsSpec
from tests.support.nats import NatsServer
from tests.support.procs import ServiceProcess

ENV = {"RINGFENCE_SIMULATE_KERNEL": "1", "RINGFENCE_OPERATOR_AUTH": "off", "RINGFENCE_LOG_LEVEL": "INFO"}


async def stats(nc, expected: int, timeout: float = 2.0) -> list[dict]:
    """Counters of every enforcer instance ($SRV.STATS), waiting for `expected` answers."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.STATS.{names.service_name(names.ENFORCER)}", b"", reply=inbox)
    found = []
    deadline = time.monotonic() + timeout
    while len(found) < expected and (left := deadline - time.monotonic()) > 0:
        try:
            msg = await sub.next_msg(timeout=left)
        except Exception:
            break
        data = {}
        for ep in json.loads(msg.data).get("endpoints") or []:
            data.update(ep.get("data") or {})
        found.append(data)
    await sub.unsubscribe()
    return found


async def wait_all(nc, nodes: int, ready, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await stats(nc, nodes)
        if len(found) == nodes and all(ready(c) for c in found):
            return found
        await asyncio.sleep(0.05)
    raise TimeoutError("not every enforcer caught up")


async def request(nc, subject: str, body) -> bytes:
    msg = await nc.request(subject, msgspec.json.encode(body), timeout=30)
    reply = msgspec.json.decode(msg.data, type=api.ApiReply)
    if not reply.ok:
        raise RuntimeError(reply.error)
    return reply.result


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(len(ordered) * q))]  # noqa: E731
    return f"p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {ordered[-1]:.1f} ms"


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="ringfence-bench-fleet-"))
    server = NatsServer(work / "nats").start()
    services = [ServiceProcess(s, server.url, work / s, env=ENV).start() for s in ("policy", "locks", "audit")]
    started = time.monotonic()
    nodes = [ServiceProcess("enforcer", server.url, work / f"n{i}", "--nodename", f"sim{uuid.uuid4().hex[:6]}",
                            env=ENV).start() for i in range(args.nodes)]
    try:
        for p in services + nodes:
            p.wait_ready(300)
        print(f"{args.nodes} simulated enforcers up in {time.monotonic() - started:.0f}s")
        nc = await nats.connect(server.url)
        await wait_all(nc, args.nodes, lambda c: "policy_revision" in c)

        sent, returned = [], []
        for k in range(args.updates):
            resource = NetworkRestrictions(version="v4", spec=NetworkRestrictionsSpec(
                allow=[CIDRRule("127.0.0.0/8"), CIDRRule(f"10.9.{k}.0/24")]))
            body = api.CreateRequest(resources=[msgspec.Raw(msgspec.json.encode(resource))])
            before = max(c.get("policy_revision", 0) for c in await stats(nc, args.nodes))
            t_send = time.time() * 1000
            await request(nc, names.api_subject(names.POLICY_API, "create"), body)
            t_return = time.time() * 1000
            found = await wait_all(nc, args.nodes, lambda c, r=before: c["policy_revision"] > r)
            sent += [c["policy_applied_ms"] - t_send for c in found]
            returned += [max(0.0, c["policy_applied_ms"] - t_return) for c in found]
        print(f"policy propagation to {args.nodes} enforcers x {args.updates} updates:")
        print(f"  from the create request: {percentiles(sent)}")
        print(f"  after create returned:   {percentiles(returned)} (0 = applied before the reply arrived)")

        sent, returned = [], []
        for k in range(args.updates):
            t_send = time.time() * 1000
            await request(nc, names.api_subject(names.LOCKS_API, "lock"),
                          api.LockRequest(target=LockTarget(user=f"fleet-user-{k}")))
            t_return = time.time() * 1000
            found = await wait_all(nc, args.nodes, lambda c, n=k + 1: c.get("locks_known", 0) >= n)
            sent += [c["locks_changed_ms"] - t_send for c in found]
            returned += [max(0.0, c["locks_changed_ms"] - t_return) for c in found]
        print(f"lock propagation to {args.nodes} enforcers x {args.updates} locks:")
        print(f"  from the lock request:   {percentiles(sent)}")
        print(f"  after lock returned:     {percentiles(returned)}")

        total = args.nodes * args.events_per_node
        log_dir = work / "audit" / "log"

        def flood_lines() -> list[bytes]:  # the flood's events (not the anchors, nor policy and lock events)
            return [line for f in daily_files(log_dir) for line in event_lines(f) if b'"program":"simulated"' in line]

        t0 = time.monotonic()
        ids = [(work / f"n{i}" / "host_uuid").read_text().strip() for i in range(args.nodes)]
        await asyncio.gather(*(request(nc, names.enforcer_subject(i, "simulate"), {"events": args.events_per_node})
                               for i in ids))
        deadline = time.monotonic() + 600
        while len(flood_lines()) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - t0
        simulated = [json.loads(line) for line in flood_lines()]
        uids = {e["uid"] for e in simulated}
        lost, doubled = total - len(uids), len(simulated) - len(uids)
        print(f"audit: {total} events from {args.nodes} enforcers written in {elapsed:.1f}s = "
              f"{total / elapsed:,.0f} events/s; lost {lost}, written twice {doubled}")
        await nc.close()
        return 0 if lost == 0 and doubled == 0 else 1
    finally:
        for p in nodes + services:
            p.stop(timeout=5)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--events-per-node", type=int, default=1000)
    return asyncio.run(run(parser.parse_args(argv)))
