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
import ipaddress
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

from ..config import (
    ENV_CONFIG_WARNED,
    ENV_NATS_SYSTEM_NKEY,
    ENV_NATS_TLS_CA,
    ENV_NATS_URL,
    ENV_NODE_AUTH_ISSUER,
    Config,
    listen_argument,
    parse_listen,
)
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
from ..runtime.tls_certs import ServerTls, ensure_server_tls, tls_block
from .bootstrap import BootstrapError, bootstrap_admin
from .client import NATS_URL_FILE, CliError, config_from
from .tls_pin import pin_of

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
    env: dict[str, str] | None = None  # added to this process's environment
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
            env={**os.environ, **child.env} if child.env else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        child.started = time.monotonic()
        child.pump = asyncio.create_task(self._pump(child, child.proc))

    async def _copy_output(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            self.emit(child.name, raw.decode(errors="replace").rstrip("\n"))

    async def _pump(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        output = asyncio.create_task(self._copy_output(child, proc))
        code = await exit_code(proc)
        # Its last lines; a process it started and left running may keep the pipe open for ever.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(output), 1.0)
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
        asked = time.monotonic()
        try:
            await asyncio.wait_for(exit_code(proc), STOP_GRACE_SECONDS)
            self.emit("up", f"{child.name} stopped in {time.monotonic() - asked:.2f}s (exit code {proc.returncode})")
        except TimeoutError:
            self.emit("up", f"{child.name} did not stop within {STOP_GRACE_SECONDS:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await exit_code(proc)
        if child.pump:
            # The rest of its output; a process it left behind may hold the pipe open for ever.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(child.pump, 2.0)
        # Our end of its pipe, now: left to the garbage collector it is closed after the loop is.
        proc._transport.close()  # type: ignore[attr-defined]


async def exit_code(proc: asyncio.subprocess.Process) -> int:
    """The child's exit code once it has exited. Not proc.wait(): that also waits until nobody
    holds its output pipe, and a process it started (a session relay of the enforcer) may."""
    while proc.returncode is None:
        await asyncio.sleep(0.02)
    return proc.returncode


NATS_PORT_FIX = "choose another with --nats-port, or use that NATS with --nats-url"


def _check_port_free(host: str, port: int, what: str = "", fix: str = NATS_PORT_FIX) -> None:
    with socket.socket() as probe:
        # As nats-server binds: connections of a NATS that just stopped (TIME_WAIT) do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise CliError(
                f"port {port} on {host} is in use{what} (another NATS or `ringfence up`?); {fix}"
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
    """Host and port for an embedded nats-server (--listen, default 127.0.0.1), or None to use an existing NATS."""
    if args.nats_url or os.environ.get(ENV_NATS_URL):
        if args.listen:
            raise CliError("--listen is where the embedded NATS listens; it cannot be used with --nats-url")
        return None
    url = urlsplit(cfg.nats_urls[0])
    if (url.hostname or "127.0.0.1") not in LOCAL_HOSTS:
        return None  # the config points at a remote NATS
    host, port = "127.0.0.1", args.nats_port or url.port or 4222
    if args.listen:
        text = args.listen
        left, sep, right = text.rpartition(":")
        if sep and right.isdigit() and (":" not in left or left.startswith("[")):  # HOST:PORT, [V6]:PORT
            try:
                return parse_listen(text)
            except ValueError as exc:
                raise CliError(f"--listen {exc}") from None
        host = text.strip("[]")
    return host, port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _server_tls(args: argparse.Namespace, data_dir: Path, host: str) -> ServerTls | None:
    """TLS for the client port: required off loopback; certificates given, or made in <data_dir>/tls."""
    given = (args.tls_cert, args.tls_key)
    if any(given) and not all(given):
        raise CliError("--tls-cert and --tls-key go together")
    if all(given):
        return ServerTls(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca or args.tls_cert))
    if _is_loopback(host):
        return None
    fqdn = socket.getfqdn()
    return ensure_server_tls(data_dir / "tls", [host, "127.0.0.1", "::1", "localhost", socket.gethostname(), fqdn])


DEFAULT_WEB_LISTEN = "127.0.0.1:3080"


def _web_listen(text: str) -> str:
    return text if text == "off" else listen_argument(text)


def _service_list(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in names.SERVICES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown service {', '.join(unknown) or '(none)'}; choose from {','.join(names.SERVICES)}"
        )
    return chosen


def _metrics_ports(listen: str | None, services: list[str]) -> dict[str, str]:
    """--metrics-listen HOST:PORT: the services get PORT, PORT+1, ... in the order they start."""
    if not listen:
        return {}
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise CliError(f"--metrics-listen {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    for n in range(len(services)):
        _check_port_free(host, port + n, f" (metrics of {services[n]})", "choose another --metrics-listen")
    return {svc: f"{shown}:{port + n}" for n, svc in enumerate(services)}


async def bootstrap(cfg: Config, nats_urls: list[str], seed: str | None, replicas: int = 1,
                    tls_ca: str = "") -> Path | None:
    """Streams, buckets and the first admin, before any service starts; the new identity file or None.

    A cluster that is still electing its JetStream leader is waited for."""
    nc = await connect(nats_urls, "ringfence-up", retry_forever=False, connect_timeout=5.0, nkey_seed=seed,
                       tls_ca=tls_ca or None)
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
    tls: ServerTls | None = None


def _route_secret(store: Path) -> str:
    path = store / ROUTE_SECRET
    if not path.exists():
        try:
            write_secret(path, secrets.token_hex(24) + "\n")
        except FileExistsError:  # created meanwhile by another `up`: use that one
            pass
    return path.read_text().strip()


async def _start_embedded(sup: Supervisor, cfg: Config, data_dir: Path, host: str, port: int,
                          cluster: int, tls: ServerTls | None = None) -> EmbeddedNats:
    """One nats-server (cluster 0), or `cluster` nodes routed to each other; started and listening.
    Clients connect on `host` (with `tls` when given); routes stay on loopback."""
    count = cluster or 1
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where the local services connect
    clients = [port + i for i in range(count)]
    routes = [port + ROUTE_PORT_OFFSET + i for i in range(count)] if cluster else []
    for n, client_port in enumerate(clients):
        _check_port_free(host, client_port, f" (client port of NATS node {n + 1})" if cluster else "")
    for n, route_port in enumerate(routes):
        _check_port_free("127.0.0.1", route_port, f" (route port of NATS node {n + 1})")
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # Every client authenticates: one nkey per service and one for the CLI (runtime/nats_security.py).
    publics = nats_security.ensure_credentials(store)
    credentials = {role: str(nats_security.seed_path(store, role)) for role in publics}
    authorization = nats_security.authorization_block(publics) + (tls_block(tls) if tls else "")
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
                cluster=cluster_block(host="127.0.0.1", port=routes[n], routes=routes, secret=secret),
            )
            children.append(Child(f"nats{n + 1}", [binary, "--config", str(conf)]))
    try:
        for child in children:
            await sup.start(child)
        for child, client_port in zip(children, clients, strict=True):
            await _wait_for_port(local, client_port, child)
    except BaseException:
        await asyncio.gather(*(sup.stop_child(c) for c in children))
        raise
    scheme, shown = ("tls" if tls else "nats"), (f"[{local}]" if ":" in local else local)
    return EmbeddedNats(children, [f"{scheme}://{shown}:{p}" for p in clients], credentials, tls)


def record_nats_url(data_dir: Path, urls: list[str]) -> Path:
    """Write the stack's NATS URL(s) to <data_dir>/nats_url (0600, replaced atomically):
    the CLI on this node uses them when neither --nats-url nor RINGFENCE_NATS_URL is given."""
    path = data_dir / NATS_URL_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(",".join(urls) + "\n")
    os.replace(tmp, path)
    return path


async def run(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    cfg = config_from(args, warnings, recorded_url=False)  # up decides the URL; the recorded one is its output
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
    tls_ca = ""
    if endpoint:
        host, port = endpoint
        tls = _server_tls(args, data_dir, host)
        embedded = await _start_embedded(sup, cfg, data_dir, host, port, cluster, tls)
        nats_children, nats_urls, credentials = embedded.children, embedded.urls, embedded.credentials
        if tls:
            tls_ca = str(tls.ca)
            sup.emit("up", f"NATS listens on {host}:{port} with TLS (certificate {tls.cert}); nodes pin its CA "
                           f"{tls.ca}: {pin_of(tls.ca.read_bytes())} (`ringfence tokens add` prints the join command)")
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
    tls_ca = tls_ca or cfg.nats_tls_ca

    async def stop_nats() -> None:
        await asyncio.gather(*(sup.stop_child(c) for c in nats_children))

    try:
        admin = await bootstrap(cfg, nats_urls, credentials.get(nats_security.UP) or cfg.nats_nkey or None,
                                replicas, tls_ca)
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
    recorded = record_nats_url(data_dir, nats_urls)
    sup.emit("up", f"NATS URL recorded in {recorded}: the CLI on this node uses it without --nats-url")
    if admin:
        sup.emit("up", f"bootstrap admin identity: {admin}")
        sup.emit("up", "  (role admin: every verb on every resource; root on this node signs with it by default, "
                       "elsewhere pass --identity)")

    common = ["--data-dir", str(data_dir), "--nats-url", ",".join(nats_urls), "--nodename", cfg.nodename]
    if cluster:
        common += ["--nats-replicas", str(replicas)]
    if args.config:
        common += ["--config", args.config]
    metrics = _metrics_ports(args.metrics_listen, args.services)
    for svc in args.services:
        creds = ["--nats-nkey", credentials[svc]] if svc in credentials else []
        if svc in metrics:
            creds += ["--metrics-listen", metrics[svc]]
        env = {ENV_NATS_TLS_CA: tls_ca} if tls_ca else {}
        if svc == names.POLICY and nats_security.ISSUER in credentials:
            # It answers the auth callout for joined nodes and cuts off removed ones.
            env |= {ENV_NODE_AUTH_ISSUER: credentials[nats_security.ISSUER],
                    ENV_NATS_SYSTEM_NKEY: credentials[nats_security.SYSTEM]}
        child = Child(svc, [sys.executable, "-m", f"services.{svc}", *common, *creds], env)
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
    for svc, listen in metrics.items():
        sup.emit("up", f"metrics of {svc}: http://{listen}/metrics")

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
    p.add_argument("--listen", metavar="ADDR[:PORT]",
                   help="where the embedded NATS takes clients (default 127.0.0.1:--nats-port); off loopback it "
                   "requires TLS: --tls-cert/--tls-key, or a CA and certificate made in <data_dir>/tls on first start")
    p.add_argument("--tls-cert", metavar="PEM", help="the NATS server's certificate (chain) for --listen")
    p.add_argument("--tls-key", metavar="PEM", help="its private key")
    p.add_argument("--tls-ca", metavar="PEM", help="the CA that signed --tls-cert, for the local services")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve each service's Prometheus metrics at http://HOST:PORT/metrics, the services taking "
                   "consecutive ports from PORT in --services order (printed at start); default off")
    p.add_argument(
        "--services",
        type=_service_list,
        default=list(names.SERVICES),
        help=f"comma-separated subset to start (default: {','.join(names.SERVICES)})",
    )
    p.set_defaults(func=run)
