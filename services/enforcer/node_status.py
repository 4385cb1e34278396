"""The node's own line in `ringfence nodes ls`: every STATUS_EVERY seconds the enforcer writes
what it runs and how current it is under its server_id (names.NODE_STATUS_BUCKET)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from ringfence import __version__
from ringfence.contract import names
from ringfence.contract.fleet import NodeStatus
from ringfence.runtime.service import ServiceContext

log = logging.getLogger(__name__)

STATUS_EVERY = 10.0


def status_of(ctx: ServiceContext, lock_view_age: float) -> NodeStatus:
    return NodeStatus(nodename=ctx.config.nodename, server_id=ctx.server_id, hostname=ctx.hostname,
                      version=__version__, seen=time.time(), policy_revision=ctx.counters.get("policy_revision", 0),
                      lock_view_age=round(lock_view_age, 3))


async def report(ctx: ServiceContext, lock_view_age: Callable[[], float], stop: asyncio.Event) -> None:
    kv = None
    while not stop.is_set():
        try:
            kv = kv or await ctx.js.key_value(names.NODE_STATUS_BUCKET)
            await kv.put(names.node_token(ctx.server_id), msgspec.json.encode(status_of(ctx, lock_view_age())))
        except Exception as exc:  # NATS away: the next round tries again; `nodes ls` shows the age
            ctx.counters["status_report_failures"] = ctx.counters.get("status_report_failures", 0) + 1
            log.warning("cannot report node status: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_EVERY)
