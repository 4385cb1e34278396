"""`ringfence status`: every running service instance, found by NATS service discovery."""

from __future__ import annotations

import argparse
import asyncio
import json

from nats.aio.client import Client

from ..contract import names
from .client import open_client

DISCOVERY_WAIT = 1.0  # seconds to collect replies; every instance answers within it


async def discover(nc: Client, verb: str = "INFO", wait: float = DISCOVERY_WAIT) -> list[dict]:
    """Ask every service on the bus ($SRV.<verb>) and gather the answers."""
    replies: list[dict] = []
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.{verb}", b"", reply=inbox)
    await nc.flush()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (left := deadline - loop.time()) > 0:
        try:
            msg = await sub.next_msg(timeout=left)
        except Exception:  # nats TimeoutError: no more answers within the wait
            break
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            continue
    await sub.unsubscribe()
    return [r for r in replies if str(r.get("name", "")).startswith(names.SERVICE_NAME_PREFIX)]


def missing_services(instances: list[dict]) -> list[str]:
    running = {i["name"].removeprefix(names.SERVICE_NAME_PREFIX) for i in instances}
    return [s for s in names.SERVICES if s not in running]


async def run(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        verb = "STATS" if args.stats else "INFO"
        instances = await discover(nc, verb, args.wait)
    finally:
        await nc.close()
    instances.sort(key=lambda i: (i["name"], i.get("metadata", {}).get("nodename", ""), i["id"]))
    missing = missing_services(instances)
    if args.format == "json":
        print(json.dumps({"instances": instances, "missing": missing}, indent=2))
    else:
        rows = [("SERVICE", "VERSION", "HOST", "NODE", "ID")]
        for i in instances:
            md = i.get("metadata") or {}
            rows.append(
                (
                    i["name"].removeprefix(names.SERVICE_NAME_PREFIX),
                    i.get("version", ""),
                    md.get("host", ""),
                    md.get("nodename", ""),
                    i["id"],
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        if args.stats:
            for i in instances:
                data = {}
                for ep in i.get("endpoints") or []:
                    data.update(ep.get("data") or {})
                if data:
                    label = f"{i['name'].removeprefix(names.SERVICE_NAME_PREFIX)} {i['id']}"
                    print(f"{label}: " + ", ".join(f"{k}={v}" for k, v in sorted(data.items())))
        if missing:
            print(f"missing: {', '.join(missing)} (not running, or not connected to this NATS)")
        else:
            print(f"all {len(names.SERVICES)} services running")
    return 1 if missing else 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        parents=[common],
        help="list running service instances",
        description="List every running Ringfence service instance (NATS service discovery) "
        "and name the services that are missing. Exits 1 when one is missing.",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--stats", action="store_true", help="include each instance's counters")
    p.add_argument("--wait", type=float, default=DISCOVERY_WAIT, help="seconds to wait for answers")
    p.set_defaults(func=run)
