"""`ringfence status`: every running service instance, found by NATS service discovery."""

from __future__ import annotations

import argparse
import asyncio
import json

from nats.aio.client import Client

from ..contract import names
from .client import open_client

DISCOVERY_WAIT = 1.0  # seconds to collect replies at most; every instance answers within it
# Once each of the four services has answered, a pause this long with no new answer ends the
# wait: instances answer together (one round trip each), so the rest of the second is idle.
QUIET = 0.05


async def discover(nc: Client, verb: str = "INFO", wait: float = DISCOVERY_WAIT,
                   quiet: float | None = QUIET) -> list[dict]:
    """Ask every service on the bus ($SRV.<verb>) and gather the answers for `wait` seconds,
    or (with `quiet`) until all four services have answered and no other answer follows."""
    replies: list[dict] = []
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.{verb}", b"", reply=inbox)
    await nc.flush()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (left := deadline - loop.time()) > 0:
        if quiet is not None and not missing_services(_ours(replies)):
            left = min(left, quiet)
        try:
            msg = await sub.next_msg(timeout=left)
        except Exception:  # nats TimeoutError: no more answers within the wait
            break
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            continue
    await sub.unsubscribe()
    return _ours(replies)


def _ours(replies: list[dict]) -> list[dict]:
    return [r for r in replies if str(r.get("name", "")).startswith(names.SERVICE_NAME_PREFIX)]


def missing_services(instances: list[dict]) -> list[str]:
    running = {i["name"].removeprefix(names.SERVICE_NAME_PREFIX) for i in instances}
    return [s for s in names.SERVICES if s not in running]


async def run(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        verb = "STATS" if args.stats else "INFO"
        if args.wait is None:
            instances = await discover(nc, verb)
        else:
            instances = await discover(nc, verb, args.wait, quiet=None)
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
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help=f"wait this long for answers (default: until all four services have answered and "
                   f"{QUIET * 1000:.0f} ms pass without another, at most {DISCOVERY_WAIT:.0f} s)")
    p.set_defaults(func=run)
