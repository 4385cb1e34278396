"""A joining host learns the control plane's CA from the server itself, and keeps it only when
its sha256 matches the pin the operator got from `ringfence tokens add` (printed next to the
token): the token is sent only over a connection verified against that CA.

NATS sends its INFO line in clear first, then the client starts TLS; the server's certificate
file holds its certificate and the CA (`ringfence up --listen` writes it so), so the CA
arrives in the handshake.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from ..config import load_config
from .client import LOCAL_TLS_CA, CliError

PIN_PREFIX = "sha256:"


def pin_of(pem_or_der: bytes) -> str:
    der = ssl.PEM_cert_to_DER_cert(pem_or_der.decode()) if pem_or_der.lstrip().startswith(b"-----") else pem_or_der
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def join_hint(args: argparse.Namespace) -> str:
    """` --ca-pin=sha256:...` for the join command line, when this node's data dir has the CA `up` made."""
    ca = Path(load_config(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None)).data_dir) \
        / LOCAL_TLS_CA
    try:
        return f" --ca-pin={pin_of(ca.read_bytes())}"
    except (OSError, ValueError):
        return ""


def _server_chain(host: str, port: int, timeout: float = 5.0) -> list[bytes]:
    with socket.create_connection((host, port), timeout=timeout) as raw:
        info = raw.recv(4096)
        if not info.startswith(b"INFO"):
            raise CliError(f"{host}:{port} is not a NATS server (it said {info[:40]!r})")
        if b'"tls_required":true' not in info.replace(b" ", b""):
            raise CliError(f"NATS at {host}:{port} does not use TLS; --ca-pin needs a tls:// server")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # verified below against the pin, before anything is sent
        with context.wrap_socket(raw, server_hostname=host) as tls:
            chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[union-attr]
            return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


def fetch_pinned_ca(url: str, pin: str, data_dir: Path) -> Path:
    """The server's CA whose sha256 is `pin`, written to <data_dir>/tls/ca.pem; CliError otherwise."""
    if not pin.startswith(PIN_PREFIX) or len(pin) != len(PIN_PREFIX) + 64:
        raise CliError(f'--ca-pin "{pin[:80]}": expected sha256:<64 hex digits> as `ringfence tokens add` prints it')
    parts = urlsplit(url)
    try:
        chain = _server_chain(parts.hostname or "127.0.0.1", parts.port or 4222)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot fetch the TLS certificate of {url}: {exc}") from None
    for der in chain:
        if pin_of(der) == pin.lower():
            path = data_dir / LOCAL_TLS_CA
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(ssl.DER_cert_to_PEM_cert(der))
            return path
    raise CliError(f"no certificate NATS at {url} presented matches --ca-pin {pin}: this may not be your control "
                   "plane (or its CA changed); nothing was sent")
