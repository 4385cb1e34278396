"""`ringfence up`: an embedded nats-server plus the four services, in the foreground.

With `--cluster N` (3 or 5) the embedded NATS is N local nats-server nodes routed into
one JetStream cluster (stores under <data_dir>/nats/n1..nN), every stream and bucket
is kept N times, and the services get every node's URL: one node may die (two of
five) and everything carries on.

Each child's output is prefixed with its name. SIGINT/SIGTERM stop the
services first, then NATS, and nothing is left behind: children are in their
own process groups (so a terminal's Ctrl-C reaches only us and we stop them in
order) and carry PR_SET_PDEATHSIG, so even a SIGKILLed `up` takes them along.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from nats.errors import Error as NatsError
from nats.errors import NoServersError

from ..config import ENV_CONFIG_WARNED, ENV_NATS_URL, Config, parse_listen
from ..contract import names
from ..contract.streams import StreamSetupError, ensure_streams_ready
from ..keyfiles import write_secret
from ..runtime import nats_security
from ..runtime.nats_conn import (
    NatsCredentialError,
    cluster_block,
    connect,
    nats_server_binary,
    wait_closed,
    write_server_config,
)
from .bootstrap import BootstrapError, bootstrap_admin
from .client import CliError, config_from
from .web import listen_address

log = logging.getLogger(__name__)

EARLY_EXIT_SECONDS = 5.0  # a child that dies this soon after start failed to start
STOP_GRACE_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 30.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
ROUTE_PORT_OFFSET = 2000  # --cluster: node i takes client port nats_port+i and route port nats_port+2000+i
CLUSTER_SIZES = (3, 5)
ROUTE_SECRET = "route.secret"  # <data_dir>/nats/: the password cluster routes authenticate with

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the child between fork and exec: die with the parent."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    pump: asyncio.Task | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.children: list[Child] = []
        self.stopping = False
        self.failed: str | None = None
        self.wake = asyncio.Event()

    def emit(self, name: str, line: str) -> None:
        self.out.write(f"{name:<8}| {line}\n")
        self.out.flush()

    async def start(self, child: Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        child.started = time.monotonic()
        child.pump = asyncio.create_task(self._pump(child, child.proc))

    async def _pump(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            self.emit(child.name, raw.decode(errors="replace").rstrip("\n"))
        code = await proc.wait()
        if self.stopping:
            return
        ran = time.monotonic() - child.started
        if ran < EARLY_EXIT_SECONDS:
            self.failed = f"{child.name} exited with code {code} right after starting; see its output above"
            self.wake.set()
            return
        delay = min(MAX_BACKOFF_SECONDS, 2.0**child.restarts)
        child.restarts += 1
        self.emit("up", f"{child.name} exited with code {code}; restarting in {delay:.0f}s")
        await asyncio.sleep(delay)
        if not self.stopping:
            await self.start(child)

    async def stop_child(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            self.emit("up", f"{child.name} did not stop within {STOP_GRACE_SECONDS:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if child.pump:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(child.pump, 2.0)


def _check_port_free(host: str, port: int, what: str = "", fix: str = "") -> None:
    with socket.socket() as probe:
        # As nats-server binds: connections of a NATS that just stopped (TIME_WAIT) do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise CliError(
                f"port {port} on {host} is in use{what} (another NATS or `ringfence up`?); "
                + (fix or "choose another with --nats-port, or use that NATS with --nats-url")
            ) from None


async def _wait_for_port(host: str, port: int, child: Child, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc and child.proc.returncode is not None:
            raise CliError(
                f"nats-server exited with code {child.proc.returncode}; see its output above "
                f"(is port {port} in use? choose another with --nats-port, or use --nats-url)"
            )
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise CliError(f"nats-server did not accept connections on {host}:{port} within {timeout:.0f}s")


def _embedded_endpoint(cfg: Config, args: argparse.Namespace) -> tuple[str, int] | None:
    """Host and port for an embedded nats-server, or None to use an existing NATS."""
    if args.nats_url or os.environ.get(ENV_NATS_URL):
        return None
    url = urlsplit(cfg.nats_urls[0])
    host = url.hostname or "127.0.0.1"
    if host not in LOCAL_HOSTS:
        return None  # the config points at a remote NATS
    return "127.0.0.1", args.nats_port or url.port or 4222


DEFAULT_WEB_LISTEN = "127.0.0.1:3080"


def _web_listen(text: str) -> str:
    return text if text == "off" else listen_address(text)


def _service_list(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in names.SERVICES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown service {', '.join(unknown) or '(none)'}; choose from {','.join(names.SERVICES)}"
        )
    return chosen


async def bootstrap(cfg: Config, nats_urls: list[str], seed: str | None, replicas: int = 1) -> Path | None:
    """Streams, buckets and the first admin, before any service starts; the new identity file or None.

    A cluster that is still electing its JetStream leader is waited for."""
    nc = await connect(nats_urls, "ringfence-up", retry_forever=False, connect_timeout=5.0, nkey_seed=seed)
    try:
        js = nc.jetstream()
        await ensure_streams_ready(js, replicas, timeout=60)
        return await bootstrap_admin(js, cfg)
    finally:
        await wait_closed(nc, 2)


@dataclass
class EmbeddedNats:
    """The nats-server child(ren) of `up`, their client URLs and the credentials for the services."""
    children: list[Child]
    urls: list[str]
    credentials: dict[str, str]


def _route_secret(store: Path) -> str:
    path = store / ROUTE_SECRET
    if not path.exists():
        try:
            write_secret(path, secrets.token_hex(24) + "\n")
        except FileExistsError:  # created meanwhile by another `up`: use that one
            pass
    return path.read_text().strip()


async def _start_embedded(sup: Supervisor, cfg: Config, data_dir: Path, host: str, port: int,
                          cluster: int) -> EmbeddedNats:
    """One nats-server (cluster 0), or `cluster` nodes routed to each other; started and listening."""
    count = cluster or 1
    clients = [port + i for i in range(count)]
    routes = [port + ROUTE_PORT_OFFSET + i for i in range(count)] if cluster else []
    for n, client_port in enumerate(clients):
        _check_port_free(host, client_port, f" (client port of NATS node {n + 1})" if cluster else "")
    for n, route_port in enumerate(routes):
        _check_port_free(host, route_port, f" (route port of NATS node {n + 1})")
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # Every client authenticates: one nkey per service and one for the CLI (runtime/nats_security.py).
    publics = nats_security.ensure_credentials(store)
    credentials = {role: str(nats_security.seed_path(store, role)) for role in publics}
    authorization = nats_security.authorization_block(publics)
    binary = nats_server_binary()
    children = []
    if not cluster:
        conf = write_server_config(
            store / "nats-server.conf", store_dir=store, host=host, port=port,
            server_name=f"ringfence-{cfg.nodename}", extra=authorization,
        )
        children.append(Child("nats", [binary, "--config", str(conf)]))
    else:
        secret = _route_secret(store)
        for n in range(count):
            node_dir = store / f"n{n + 1}"
            conf = write_server_config(
                node_dir / "nats-server.conf", store_dir=node_dir, host=host, port=clients[n],
                server_name=f"ringfence-{cfg.nodename}-n{n + 1}", extra=authorization,
                cluster=cluster_block(host=host, port=routes[n], routes=routes, secret=secret),
            )
            children.append(Child(f"nats{n + 1}", [binary, "--config", str(conf)]))
    try:
        for child in children:
            await sup.start(child)
        for child, client_port in zip(children, clients, strict=True):
            await _wait_for_port(host, client_port, child)
    except BaseException:
        await asyncio.gather(*(sup.stop_child(c) for c in children))
        raise
    return EmbeddedNats(children, [f"nats://{host}:{p}" for p in clients], credentials)


async def run(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    cfg = config_from(args, warnings)
    data_dir = Path(cfg.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create data dir {data_dir}: {exc.strerror}; use --data-dir") from None

    sup = Supervisor()
    for line in warnings:  # once here, not once per service
        sup.emit("up", f"warning: {line}")
    os.environ[ENV_CONFIG_WARNED] = "1"
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sup.wake.set)

    if args.web_listen != "off":
        web_host, web_port = parse_listen(args.web_listen)
        if web_port:
            _check_port_free(web_host, web_port, " (the web console)", "choose another with --web-listen, or "
                             "--web-listen off")
    endpoint = _embedded_endpoint(cfg, args)
    cluster = args.cluster or 0
    if cluster and not endpoint:
        raise CliError("--cluster runs its own local NATS nodes; it cannot be used with --nats-url, "
                       "RINGFENCE_NATS_URL or a remote nats_url in the config")
    replicas = cluster or cfg.nats_replicas
    nats_children: list[Child] = []
    if endpoint:
        host, port = endpoint
        embedded = await _start_embedded(sup, cfg, data_dir, host, port, cluster)
        nats_children, nats_urls, credentials = embedded.children, embedded.urls, embedded.credentials
        store = data_dir / "nats"
        auth_note = (f"clients authenticate with the nkeys there, the CLI with "
                     f"{credentials[nats_security.CLI]}")
        if cluster:
            sup.emit("up", f"embedded NATS cluster of {cluster} nodes with JetStream on {','.join(nats_urls)} "
                           f"(stores {store}/n1..n{cluster}; every stream and bucket kept {replicas} times; "
                           f"{auth_note})")
            sup.emit("up", f"  CLI from anywhere: RINGFENCE_NATS_URL={','.join(nats_urls)}")
        else:
            sup.emit("up", f"embedded NATS with JetStream on {nats_urls[0]} (store {store}; {auth_note})")
    else:
        nats_urls = cfg.nats_urls
        credentials = {}
        sup.emit("up", f"using NATS at {cfg.nats_url}")

    async def stop_nats() -> None:
        await asyncio.gather(*(sup.stop_child(c) for c in nats_children))

    try:
        admin = await bootstrap(cfg, nats_urls, credentials.get(nats_security.UP) or cfg.nats_nkey or None,
                                replicas)
    except StreamSetupError as exc:
        await stop_nats()
        raise CliError(str(exc)) from None
    except (BootstrapError, NatsCredentialError, NatsError, NoServersError, OSError, TimeoutError) as exc:
        message = f"creating the streams and the bootstrap admin failed: {exc!r}"
        if not nats_children:  # someone else's NATS: the services may still manage
            sup.emit("up", f"warning: {message}")
            admin = None
        else:
            await stop_nats()
            raise CliError(message) from None
    if admin:
        sup.emit("up", f"bootstrap admin identity: {admin}")
        sup.emit("up", "  (role admin: every verb on every resource; root on this node signs with it by default, "
                       "elsewhere pass --identity)")

    common = ["--data-dir", str(data_dir), "--nats-url", ",".join(nats_urls), "--nodename", cfg.nodename]
    if cluster:
        common += ["--nats-replicas", str(replicas)]
    if args.config:
        common += ["--config", args.config]
    for svc in args.services:
        creds = ["--nats-nkey", credentials[svc]] if svc in credentials else []
        child = Child(svc, [sys.executable, "-m", f"services.{svc}", *common, *creds])
        sup.children.append(child)
        await sup.start(child)
    started = list(args.services)
    if args.web_listen != "off":
        creds = ["--nats-nkey", credentials[nats_security.WEB]] if nats_security.WEB in credentials else []
        child = Child(names.WEB, [sys.executable, "-m", "services.web", *common, "--listen", args.web_listen, *creds])
        sup.children.append(child)
        await sup.start(child)
        started.append(f"the web console on {args.web_listen} (sign in: `ringfence web login`)")
    sup.emit("up", f"started {', '.join(started)}; `ringfence status` lists them; Ctrl-C stops all")

    await sup.wake.wait()
    sup.stopping = True
    sup.emit("up", "stopping" if not sup.failed else f"stopping: {sup.failed}")
    await asyncio.gather(*(sup.stop_child(c) for c in sup.children))
    await stop_nats()
    sup.emit("up", "stopped")
    return 1 if sup.failed else 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "up",
        parents=[common],
        help="start NATS and every service in the foreground",
        description="Start an embedded nats-server with JetStream (store under the data dir) and the "
        "policy, locks, enforcer and audit services, with output prefixed per service. Ctrl-C or "
        "SIGTERM stops everything. With --nats-url (or RINGFENCE_NATS_URL) an existing NATS is used "
        "instead of the embedded one. With --cluster 3 the embedded NATS is three local nodes of one "
        "JetStream cluster, every stream and bucket replicated on each. The enforcer needs root, cgroup v2 and BPF.",
    )
    p.add_argument("--nats-port", type=int,
                   help="port of the embedded nats-server (default 4222); with --cluster N, nodes take this "
                   f"port and the next N-1, and route ports {ROUTE_PORT_OFFSET} above them")
    p.add_argument("--cluster", type=int, choices=CLUSTER_SIZES, metavar="N",
                   help="run N (3 or 5) local nats-server nodes as one JetStream cluster, every stream and bucket "
                   "replicated N times (nats_replicas N for the services)")
    p.add_argument("--web-listen", type=_web_listen, default=DEFAULT_WEB_LISTEN, metavar="HOST:PORT",
                   help=f"where the web console listens (default {DEFAULT_WEB_LISTEN}; port 0 picks a free one; "
                   "off: no console)")
    p.add_argument(
        "--services",
        type=_service_list,
        default=list(names.SERVICES),
        help=f"comma-separated subset to start (default: {','.join(names.SERVICES)})",
    )
    p.set_defaults(func=run)
