"""Start-up and shutdown shared by the four services.

A service provides an adapter (its thin NATS layer) with `start(ctx)` and
`stop()`. This module parses the common flags, loads the config, connects,
creates streams and buckets, registers the service for NATS service discovery
($SRV.PING/INFO/STATS) and runs until SIGTERM or SIGINT.

Every endpoint declares what it does as (resource, verb), e.g.
`ctx.add_endpoint("create", subject, handler, action=("lock", "create"))`, or
a resolver `async def (req) -> [(resource, verb), ...]` when that depends on
the body. With `operator_auth: required` (the default) a request reaches its
handler only when it is signed by a registered operator identity whose roles
allow every action (runtime/operator_auth.py); `request_actor(req)` is then
the verified user. Service discovery ($SRV.*) stays open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nats import micro
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.micro.request import Request

from .. import __version__
from ..config import Config, ConfigError, load_config
from ..contract import names
from ..contract.api import ApiError, error_reply
from ..contract.streams import StreamSetupError, ensure_streams_ready
from .logs import setup_logging
from .nats_conn import NatsCredentialError, connect, wait_closed
from .operator_auth import ActionSpec, OperatorDirectory, RequestAuth
from .stopping import unless_stopped

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[bytes]]


@dataclass
class ServiceContext:
    name: str
    config: Config
    nc: Client
    js: JetStreamContext
    hostname: str
    server_id: str
    # Counters shown under each endpoint's `data` in $SRV.STATS.
    counters: dict[str, int] = field(default_factory=dict)
    auth: RequestAuth | None = None
    _micro: micro.Service | None = None

    async def add_endpoint(self, name: str, subject: str, handler: Handler, *, action: ActionSpec = None,
                           queue_group: str | None = None):
        """Serve `subject`; ApiError becomes an error reply, anything else is logged and reported.

        `action`: (resource, verb) the caller's roles must allow, or an async
        resolver returning several. Without one, only roles allowing "*" on "*"
        may call the endpoint."""
        if action is None:
            log.warning("%s: endpoint %s declares no action; only roles allowing every verb on every "
                        "resource may call it", self.name, name)
        if self.auth is None:
            self.auth = RequestAuth("off", None, self.counters)
        request_auth = self.auth

        async def serve(req: Request) -> None:
            try:
                req._ringfence_actor = await request_auth.check(req, action)  # type: ignore[attr-defined]
                body = await handler(req)
            except ApiError as exc:
                body = error_reply(str(exc), exc.kind)
            except Exception as exc:
                log.exception("%s: request on %s failed", self.name, req.subject)
                body = error_reply(f"internal error in {self.name} service: {exc}", "internal")
            await req.respond(body)

        assert self._micro is not None
        await self._micro.add_endpoint(
            name=name, subject=subject, handler=serve, queue_group=queue_group or "ringfence"
        )


def request_actor(req: Request) -> str:
    """The user a request acts as: verified with operator_auth required, as stated when off."""
    return getattr(req, "_ringfence_actor", "")


class Adapter(Protocol):
    async def start(self, ctx: ServiceContext) -> None: ...
    async def stop(self) -> None: ...


def server_id_for(data_dir: str) -> str:
    """A node's persistent identity, kept in <data_dir>/host_uuid (as the original does).

    Services starting together race to create it; link() is atomic, so exactly
    one value wins and everyone reads that one."""
    path = Path(data_dir) / "host_uuid"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".host_uuid.{os.getpid()}")
        tmp.write_text(str(uuid.uuid4()) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: /etc/ringfence.yaml when present)")
    parser.add_argument("--nats-url", help="NATS URL(s), comma-separated (env RINGFENCE_NATS_URL)")
    parser.add_argument("--data-dir", help="data directory (env RINGFENCE_DATA_DIR, default /var/lib/ringfence)")
    parser.add_argument("--nodename", help="this node's name (env RINGFENCE_NODENAME, default: hostname)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env RINGFENCE_LOG_LEVEL)")
    parser.add_argument("--nats-nkey", metavar="SEED_FILE",
                        help="NATS nkey seed file to authenticate with (env RINGFENCE_NATS_NKEY)")
    parser.add_argument("--nats-replicas", type=int, metavar="N",
                        help="copies of every stream and bucket: 1, 3 or 5 (env RINGFENCE_NATS_REPLICAS)")


def run_service(short_name: str, make_adapter: Callable[[argparse.Namespace], Adapter], argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{short_name}", description=f"Ringfence {short_name} service"
    )
    common_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(short_name, args.log_level)
    try:
        config = load_config(args.config, data_dir=args.data_dir, nats_url=args.nats_url, nodename=args.nodename,
                             nats_nkey=args.nats_nkey, nats_replicas=args.nats_replicas)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        adapter = make_adapter(args)
        _run_to_the_end(_serve(short_name, config, adapter))
    except (StartupError, NatsCredentialError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(1)


async def _streams_ready(js: JetStreamContext, replicas: int, stop: asyncio.Event) -> bool:
    """Streams and buckets in shape; waits (for ever) while a cluster cannot take them yet.
    False when the service was asked to stop meanwhile."""
    try:
        return await unless_stopped(stop, ensure_streams_ready(js, replicas, timeout=None))
    except StreamSetupError as exc:
        raise StartupError(str(exc)) from None


def _run_to_the_end(main) -> None:
    """asyncio.run, except that shutdown cannot hang: asyncio.run waits forever for
    a task that swallows its cancellation (seen inside client libraries); here
    leftovers get LEFTOVER_GRACE seconds, and then the process exits regardless,
    so a stopped service never lingers."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main)
    finally:
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            _, stuck = loop.run_until_complete(asyncio.wait(leftovers, timeout=LEFTOVER_GRACE))
            if stuck:
                log.error("exiting with %d task(s) that ignored cancellation: %s", len(stuck),
                          ", ".join(sorted({t.get_coro().__qualname__ for t in stuck})))
                logging.shutdown()
                sys.stdout.flush()
                os._exit(0)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


STOP_TIMEOUT = 8.0  # a service asked to stop is gone within this, even if NATS is gone too
LEFTOVER_GRACE = 2.0


class StartupError(Exception):
    """A service cannot start; the message says why and what to do."""


async def _serve(short_name: str, config: Config, adapter: Adapter) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    nc = await connect(config.nats_urls, f"ringfence-{short_name}@{config.nodename}",
                       nkey_seed=config.nats_nkey or None)
    js = nc.jetstream()
    if not await _streams_ready(js, config.nats_replicas, stop):
        await wait_closed(nc, 2)
        return
    ctx = ServiceContext(
        name=short_name,
        config=config,
        nc=nc,
        js=js,
        hostname=socket.gethostname(),
        server_id=server_id_for(config.data_dir),
    )
    directory_stop = asyncio.Event()
    directory_tasks: list[asyncio.Task] = []
    if config.operator_auth == "required":
        directory = OperatorDirectory(nc)
        ctx.auth = RequestAuth("required", directory, ctx.counters)
        directory_tasks = [asyncio.create_task(t, name="operator-directory") for t in directory.tasks(directory_stop)]
    else:
        ctx.auth = RequestAuth("off", None, ctx.counters)
        log.warning("operator_auth is off: control requests are accepted without a signature or a role check")

    def stats_data(_endpoint: Any) -> dict[str, int]:
        return dict(ctx.counters)

    ctx._micro = await micro.add_service(
        nc,
        name=names.service_name(short_name),
        version=__version__,
        description=f"Ringfence {short_name} service",
        metadata={
            "host": ctx.hostname,
            "nodename": config.nodename,
            "server_id": ctx.server_id,
            "pid": str(os.getpid()),
        },
        stats_handler=stats_data,
    )
    try:
        await adapter.start(ctx)
        log.info("%s service ready (nats %s, data %s)", short_name, ",".join(config.nats_urls), config.data_dir)
        await stop.wait()
        log.info("%s service stopping", short_name)
    finally:
        try:
            await asyncio.wait_for(adapter.stop(), STOP_TIMEOUT)
        except TimeoutError:
            log.error("%s service did not stop within %.0fs; exiting anyway", short_name, STOP_TIMEOUT)
        finally:
            directory_stop.set()
            for task in directory_tasks:
                task.cancel()
            await asyncio.gather(*directory_tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ctx._micro.stop(), 2)
            await wait_closed(nc, 2)
