"""Start-up and shutdown shared by the four services.

A service provides an adapter (its thin NATS layer) with `start(ctx)` and
`stop()`. This module parses the common flags, loads the config, connects,
creates streams and buckets, registers the service for NATS service discovery
($SRV.PING/INFO/STATS) and runs until SIGTERM or SIGINT.

Every endpoint declares the type of its request body and what it does as
(resource, verb):

    await ctx.add_endpoint("delete", subject, self.delete, request=api.DeleteRequest,
                           action=("lock", "delete"), exclusive=True)

or a resolver `async def (call) -> [(resource, verb), ...]` when that depends
on the body. The body is decoded once; the permission check and the handler
get the same `Call(actor, body)`, and with `exclusive=True` both run inside the
service's write lock (`ctx.write_lock`), so what the check read is still true
when the handler writes. With `operator_auth: required` (the default) a request
reaches its handler only when it is signed by a registered operator identity
that no lock keeps out and whose roles allow every action
(runtime/operator_auth.py); `call.actor` is then the verified user. A handler
returns its result (sent as ApiReply); ApiError becomes an error reply that
is also a NATS micro service error (Nats-Service-Error-Code 400, 403, 404,
409, 503 or 500). Service discovery ($SRV.*) stays open.

Endpoints not converted yet pass no `request`: their handler gets the raw
Request and returns reply bytes, and `request_actor(req)` is the actor.
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
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from nats import micro
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.micro.request import Request

from .. import __version__
from ..config import ENV_CONFIG_WARNED, Config, ConfigError, load_config
from ..contract import names
from ..contract.api import ApiError, error_reply, ok_reply
from ..contract.documents import decode_request
from ..contract.streams import StreamSetupError, ensure_streams_ready
from ..durations import parse_duration
from . import nats_security
from .logs import setup_logging
from .metrics import MetricsServer
from .nats_conn import NatsCredentialError, connect, wait_closed
from .operator_auth import SELF_AUTHORIZED, ActionSpec, Operator, OperatorDirectory, RequestAuth, resolve_actions
from .stopping import unless_stopped

log = logging.getLogger(__name__)

T = TypeVar("T")

# An ApiError's kind as the code of a NATS micro service error (HTTP-like, as the micro protocol suggests).
ERROR_CODES = {"invalid": "400", "access_denied": "403", "not_found": "404", "conflict": "409",
               "unavailable": "503", "internal": "500"}
MAX_ERROR_HEADER = 200  # Nats-Service-Error: the message's first line, cut (headers are one line)


@dataclass
class Call(Generic[T]):
    """One request as its permission check and its handler see it."""

    actor: str  # the verified user (operator_auth required) or the stated one (off)
    body: T
    # KV values read while serving this call, by key: the permission check and the handler
    # read a key once between them (the adapters' _read).
    reads: dict[str, Any] = field(default_factory=dict)


# `request=`: a msgspec type, or a function decoding the body (raising ApiError) for bodies
# that need more than one type (create requests' documents).
RequestType = type | Callable[[bytes], Any]


def _decoder(request: RequestType) -> Callable[[bytes], Any]:
    if isinstance(request, type) and issubclass(request, msgspec.Struct):
        return lambda data: decode_request(data, request)
    return request  # type: ignore[return-value]


async def respond_error(req: Request, message: str, kind: str) -> None:
    """An ApiReply error body (what the CLI prints) sent as a micro service error with a code."""
    first_line = message.split("\n", 1)[0]
    description = first_line if len(first_line) <= MAX_ERROR_HEADER else first_line[: MAX_ERROR_HEADER - 3] + "..."
    await req.respond_error(ERROR_CODES.get(kind, "500"), description, data=error_reply(message, kind))


@dataclass
class ServiceContext:
    name: str
    config: Config
    nc: Client
    js: JetStreamContext
    hostname: str
    server_id: str
    # Counters shown under each endpoint's `data` in $SRV.STATS and as Prometheus metrics.
    counters: dict[str, int] = field(default_factory=dict)
    # Levels read when asked (spool depth, lock view age, ...): $SRV.STATS and metrics too.
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)
    auth: RequestAuth | None = None
    # One writer at a time in this process: endpoints registered exclusive=True (and the
    # service's own housekeeping) hold it from the permission check to the last write.
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _micro: micro.Service | None = None
    # Endpoints added while the adapter starts: served (and the service discoverable, so
    # `ringfence status` lists it) only once the start is complete.
    _pending_endpoints: list[dict[str, Any]] = field(default_factory=list)
    _stop: asyncio.Event | None = None
    failure: str = ""  # set by fail(): the service stops and exits non-zero

    def fail(self, reason: str) -> None:
        """Stop the service because part of it died (a supervisor restarts it): a service that
        carried on without, say, its lock view would enforce stale decisions."""
        if not self.failure:
            log.critical("%s service failing: %s", self.name, reason)
            self.failure = reason
        if self._stop is not None:
            self._stop.set()

    async def add_endpoint(self, name: str, subject: str, handler: Callable[[Any], Awaitable[Any]], *,
                           request: RequestType | None = None, action: ActionSpec = None,
                           exclusive: bool = False, queue_group: str | None = None) -> None:
        """Serve `subject` (see the module docstring). Without `action`, only roles allowing "*"
        on "*" may call the endpoint. Without `request`: the old form (raw Request in, bytes out)."""
        if action is None:
            log.warning("%s: endpoint %s declares no action; only roles allowing every verb on every "
                        "resource may call it", self.name, name)
        if self.auth is None:
            self.auth = RequestAuth("off", None, self.counters)
        request_auth = self.auth
        decode = _decoder(request) if request is not None else None

        async def serve(req: Request) -> None:
            try:
                # A self-authorized endpoint (a join with its token) asks for no operator identity.
                operator = Operator("") if action is SELF_AUTHORIZED else await request_auth.authenticate(req)
                served: Any = req  # what the resolver and the handler get
                if decode is not None:
                    served = Call(operator.actor, decode(req.data or b""))
                else:
                    req._ringfence_actor = operator.actor  # type: ignore[attr-defined]
                async with self.write_lock if exclusive else contextlib.nullcontext():
                    if action is not SELF_AUTHORIZED:
                        actions = await resolve_actions(action, served)
                        await request_auth.authorize(operator, actions, req.subject)
                    result = await handler(served)
                body = result if isinstance(result, bytes) else ok_reply(result)
            except ApiError as exc:
                await respond_error(req, str(exc), exc.kind)
                return
            except Exception as exc:
                log.exception("%s: request on %s failed", self.name, req.subject)
                await respond_error(req, f"internal error in {self.name} service: {exc}", "internal")
                return
            await req.respond(body)

        endpoint = {"name": name, "subject": subject, "handler": serve, "queue_group": queue_group or "ringfence"}
        if self._micro is None:
            self._pending_endpoints.append(endpoint)
        else:
            await self._micro.add_endpoint(**endpoint)


def request_actor(req: Request) -> str:
    """The user a request acts as (endpoints without `request=`): verified with operator_auth
    required, as stated when off."""
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
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (env RINGFENCE_METRICS_LISTEN; "
                             "default off)")


def run_service(short_name: str, make_adapter: Callable[[argparse.Namespace], Adapter], argv=None, *,
                add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                reads_only: tuple[str, ...] = ()) -> None:
    """`add_arguments`: the service's own flags. `reads_only`: a service that only reads (the web
    console) names the streams it reads and waits for them, instead of creating and reconfiguring
    every stream and bucket."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{short_name}", description=f"Ringfence {short_name} service"
    )
    common_arguments(parser)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(short_name, args.log_level)
    warnings: list[str] = []
    try:
        config = load_config(args.config, data_dir=args.data_dir, nats_url=args.nats_url, nodename=args.nodename,
                             nats_nkey=args.nats_nkey, nats_replicas=args.nats_replicas, warnings=warnings,
                             metrics_listen=args.metrics_listen)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(2)
    if not os.environ.get(ENV_CONFIG_WARNED):  # `ringfence up` printed them once for all its services
        for line in warnings:
            log.warning("%s", line)
    try:
        adapter = make_adapter(args)
        _run_to_the_end(_serve(short_name, config, adapter, reads_only))
    except (StartupError, NatsCredentialError, ServiceFailed) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(1)


async def _streams_ready(js: JetStreamContext, replicas: int, stop: asyncio.Event) -> bool:
    """Streams and buckets in shape; waits (for ever) while a cluster cannot take them yet.
    False when the service was asked to stop meanwhile."""
    try:
        return await unless_stopped(stop, ensure_streams_ready(js, replicas, timeout=None))
    except StreamSetupError as exc:
        raise StartupError(str(exc)) from None


async def _streams_made(js: JetStreamContext, needed: tuple[str, ...], stop: asyncio.Event) -> bool:
    """For a service that only reads: wait until the services that own them have made the streams
    it reads. False when asked to stop meanwhile."""
    waited = 0
    while not stop.is_set():
        try:
            for stream in needed:
                await js.stream_info(stream)
            return True
        except Exception as exc:  # not found yet, or NATS not answering yet
            if waited % 20 == 0:
                log.warning("waiting for the streams and buckets the other services create (%s)", exc)
            waited += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    return False


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


def read_gauges(gauges: dict[str, Callable[[], float]]) -> dict[str, float]:
    values = {}
    for name, read in gauges.items():
        try:
            values[name] = round(float(read()), 3)
        except Exception:
            log.exception("gauge %s failed", name)
    return values


class StartupError(Exception):
    """A service cannot start; the message says why and what to do."""


class ServiceFailed(Exception):
    """A part of a running service died (ServiceContext.fail); the service exits non-zero."""


async def _serve(short_name: str, config: Config, adapter: Adapter, reads_only: tuple[str, ...] = ()) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    server_id = server_id_for(config.data_dir)
    # Replies under this node's own inbox prefix: a joined node may receive nothing else.
    counters: dict[str, int] = {"nats_reconnects": 0}
    nc = await connect(config.nats_urls, f"ringfence-{short_name}@{config.nodename}",
                       nkey_seed=config.nats_nkey or None, tls_ca=config.nats_tls_ca or None,
                       inbox_prefix=nats_security.node_inbox(server_id), counters=counters)
    js = nc.jetstream()
    ready = _streams_made(js, reads_only, stop) if reads_only else _streams_ready(js, config.nats_replicas, stop)
    if not await ready:
        await wait_closed(nc, 2)
        return
    ctx = ServiceContext(
        name=short_name,
        config=config,
        nc=nc,
        js=js,
        hostname=socket.gethostname(),
        server_id=server_id,
        counters=counters,
        _stop=stop,
    )
    directory_stop = asyncio.Event()
    directory_tasks: list[asyncio.Task] = []
    if config.operator_auth == "required":
        directory = OperatorDirectory(nc, parse_duration(config.lock_view_max_staleness), ctx.counters)
        ctx.auth = RequestAuth("required", directory, ctx.counters)
        directory_tasks = [asyncio.create_task(t, name="operator-directory") for t in directory.tasks(directory_stop)]
    else:
        ctx.auth = RequestAuth("off", None, ctx.counters)
        log.warning("operator_auth is off: control requests are accepted without a signature or a role check")

    def stats_data(_endpoint: Any) -> dict[str, float]:
        return {**ctx.counters, **read_gauges(ctx.gauges)}

    async def discoverable() -> None:
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
        for endpoint in ctx._pending_endpoints:
            await ctx._micro.add_endpoint(**endpoint)
        ctx._pending_endpoints.clear()

    metrics = MetricsServer(config.metrics_listen, ctx.counters, ctx.gauges,
                            {"service": short_name, "node": config.nodename}) if config.metrics_listen else None
    try:
        await adapter.start(ctx)
        await discoverable()
        if metrics:
            try:
                metrics.start()
            except OSError as exc:
                raise StartupError(str(exc)) from None
        log.info("%s service ready (nats %s, data %s)", short_name, ",".join(config.nats_urls), config.data_dir)
        await stop.wait()
        log.info("%s service stopping", short_name)
    finally:
        try:
            await asyncio.wait_for(adapter.stop(), STOP_TIMEOUT)
        except TimeoutError:
            log.error("%s service did not stop within %.0fs; exiting anyway", short_name, STOP_TIMEOUT)
        finally:
            if metrics:
                metrics.stop()
            directory_stop.set()
            for task in directory_tasks:
                task.cancel()
            await asyncio.gather(*directory_tasks, return_exceptions=True)
            if ctx._micro is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ctx._micro.stop(), 2)
            await wait_closed(nc, 2)
    if ctx.failure:
        raise ServiceFailed(ctx.failure)
