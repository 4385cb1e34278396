"""`ringfence up`: an embedded nats-server plus the four services, in the foreground.

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
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from nats.errors import Error as NatsError
from nats.errors import NoServersError

from ..config import ENV_NATS_URL, Config
from ..contract import names
from ..contract.streams import ensure_streams
from ..runtime import nats_security
from ..runtime.nats_conn import NatsCredentialError, connect, nats_server_binary, wait_closed, write_server_config
from .bootstrap import BootstrapError, bootstrap_admin
from .client import CliError, config_from

log = logging.getLogger(__name__)

EARLY_EXIT_SECONDS = 5.0  # a child that dies this soon after start failed to start
STOP_GRACE_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 30.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}

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


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        # As nats-server binds: connections of a NATS that just stopped (TIME_WAIT) do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise CliError(
                f"port {port} on {host} is in use (another NATS or `ringfence up`?); "
                "choose another with --nats-port, or use that NATS with --nats-url"
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


def _service_list(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in names.SERVICES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown service {', '.join(unknown) or '(none)'}; choose from {','.join(names.SERVICES)}"
        )
    return chosen


async def bootstrap(cfg: Config, nats_url: str, seed: str | None) -> Path | None:
    """Streams, buckets and the first admin, before any service starts; the new identity file or None."""
    nc = await connect([nats_url], "ringfence-up", retry_forever=False, connect_timeout=5.0, nkey_seed=seed)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        return await bootstrap_admin(js, cfg)
    finally:
        await wait_closed(nc, 2)


async def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    data_dir = Path(cfg.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create data dir {data_dir}: {exc.strerror}; use --data-dir") from None

    sup = Supervisor()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sup.wake.set)

    endpoint = _embedded_endpoint(cfg, args)
    nats_child = None
    if endpoint:
        host, port = endpoint
        _check_port_free(host, port)
        store = data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        nats_url = f"nats://{host}:{port}"
        # Every client authenticates: one nkey per service and one for the CLI (runtime/nats_security.py).
        publics = nats_security.ensure_credentials(store)
        credentials = {role: str(nats_security.seed_path(store, role)) for role in publics}
        conf = write_server_config(
            store / "nats-server.conf", store_dir=store, host=host, port=port,
            server_name=f"ringfence-{cfg.nodename}", extra=nats_security.authorization_block(publics),
        )
        nats_child = Child("nats", [nats_server_binary(), "--config", str(conf)])
        await sup.start(nats_child)
        try:
            await _wait_for_port(host, port, nats_child)
        except CliError:
            await sup.stop_child(nats_child)
            raise
        sup.emit("up", f"embedded NATS with JetStream on {nats_url} (store {store}; clients authenticate "
                       f"with the nkeys there, the CLI with {credentials[nats_security.CLI]})")
    else:
        nats_url = cfg.nats_url
        credentials = {}
        sup.emit("up", f"using NATS at {nats_url}")

    try:
        admin = await bootstrap(cfg, nats_url, credentials.get(nats_security.UP) or cfg.nats_nkey or None)
    except (BootstrapError, NatsCredentialError, NatsError, NoServersError, OSError, TimeoutError) as exc:
        message = f"creating the streams and the bootstrap admin failed: {exc!r}"
        if nats_child is None:  # someone else's NATS: the services may still manage
            sup.emit("up", f"warning: {message}")
            admin = None
        else:
            await sup.stop_child(nats_child)
            raise CliError(message) from None
    if admin:
        sup.emit("up", f"bootstrap admin identity: {admin}")
        sup.emit("up", "  (role admin: every verb on every resource; root on this node signs with it by default, "
                       "elsewhere pass --identity)")

    common = ["--data-dir", str(data_dir), "--nats-url", nats_url, "--nodename", cfg.nodename]
    if args.config:
        common += ["--config", args.config]
    for svc in args.services:
        creds = ["--nats-nkey", credentials[svc]] if svc in credentials else []
        child = Child(svc, [sys.executable, "-m", f"services.{svc}", *common, *creds])
        sup.children.append(child)
        await sup.start(child)
    sup.emit("up", f"started {', '.join(args.services)}; `ringfence status` lists them; Ctrl-C stops all")

    await sup.wake.wait()
    sup.stopping = True
    sup.emit("up", "stopping" if not sup.failed else f"stopping: {sup.failed}")
    await asyncio.gather(*(sup.stop_child(c) for c in sup.children))
    if nats_child:
        await sup.stop_child(nats_child)
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
        "instead of the embedded one. The enforcer needs root, cgroup v2 and BPF.",
    )
    p.add_argument("--nats-port", type=int, help="port of the embedded nats-server (default 4222)")
    p.add_argument(
        "--services",
        type=_service_list,
        default=list(names.SERVICES),
        help=f"comma-separated subset to start (default: {','.join(names.SERVICES)})",
    )
    p.set_defaults(func=run)
