"""The CLI's side of the control APIs: connect fast, send a signed request, unwrap the reply.

Two credentials, found in this order:

- NATS (where): --nats-url, RINGFENCE_NATS_URL, the URL `ringfence up` recorded in
  <data_dir>/nats_url (root-readable: a server node finds its own stack), the config.
- NATS (who may connect): --nats-nkey, RINGFENCE_NATS_NKEY, <data_dir>/nats/cli.nk
  when readable (a server node running `ringfence up`), the config's nats_nkey;
  else anonymous.
- Operator identity (who signs control requests): --identity, RINGFENCE_IDENTITY,
  ~/.ringfence/identity, <data_dir>/admin.nk when readable (root on a server
  node); else requests go unsigned, which only services with `operator_auth: off`
  accept.
"""

from __future__ import annotations

import argparse
import os
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeout

from ..config import ENV_NATS_NKEY, ENV_NATS_URL, Config, load_config
from ..keyfiles import readable
from ..runtime.nats_conn import NatsCredentialError, connect, is_authorization_error

if TYPE_CHECKING:
    from .. import auth

T = TypeVar("T")

# A request may wait out the election of a new stream leader after a NATS cluster node
# died (4-9 s, runtime/retrying.py LEADER_WAIT) before it writes, and again before its
# audit event is stored; elections run at once, so one is the usual wait.
REQUEST_TIMEOUT = 25.0
ENV_IDENTITY = "RINGFENCE_IDENTITY"
USER_DIR = "~/.ringfence"
ADMIN_IDENTITY = "admin.nk"  # in the data dir: the bootstrap admin `ringfence up` creates
CLI_NATS_SEED = "nats/cli.nk"  # in the data dir: the cli's NATS credential `ringfence up` creates
LOCAL_TLS_CA = "tls/ca.pem"  # in the data dir: the CA `ringfence up --listen` generated
NATS_URL_FILE = "nats_url"  # in the data dir: the NATS URL(s) of the stack `ringfence up` runs


class CliError(Exception):
    """Printed as `ERROR: <message>`; the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def config_from(args: argparse.Namespace, warnings: list[str] | None = None, recorded_url: bool = True) -> Config:
    """The configuration; without --nats-url or RINGFENCE_NATS_URL, the NATS URL that
    `ringfence up` recorded in the data dir (when `recorded_url` and it is readable)."""
    def load(nats_url: str | None, warnings: list[str] | None) -> Config:
        return load_config(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None),
                           nats_url=nats_url, warnings=warnings)

    explicit = getattr(args, "nats_url", None)
    recorded = None
    if recorded_url and not explicit and not os.environ.get(ENV_NATS_URL):
        recorded = recorded_nats_url(load(None, None).data_dir)  # the data dir may come from the config
    return load(explicit or recorded, warnings)


def recorded_nats_url(data_dir: str) -> str | None:
    """The URL(s) in <data_dir>/nats_url, or None when there is none this user can read."""
    path = Path(data_dir) / NATS_URL_FILE
    if not readable(path):
        return None
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def nats_seed_file(args: argparse.Namespace, cfg: Config) -> str | None:
    """The NATS nkey seed the CLI connects with, or None (anonymous)."""
    explicit = getattr(args, "nats_nkey", None) or os.environ.get(ENV_NATS_NKEY)
    if explicit:
        return explicit
    local = Path(cfg.data_dir) / CLI_NATS_SEED
    if readable(local):
        return str(local)
    return cfg.nats_nkey or None


def nats_tls_ca(cfg: Config) -> str | None:
    """The CA the NATS server's certificate must chain to: the config's, else the one `ringfence up`
    generated in the data dir (on the server node), else the system's."""
    if cfg.nats_tls_ca:
        return cfg.nats_tls_ca
    local = Path(cfg.data_dir) / LOCAL_TLS_CA
    return str(local) if readable(local) else None


def _identity_candidates(args: argparse.Namespace, cfg: Config) -> list[tuple[Path, bool]]:
    """(path, must exist) in the order the CLI looks for its operator identity."""
    explicit = getattr(args, "identity", None) or os.environ.get(ENV_IDENTITY)
    if explicit:
        return [(Path(explicit).expanduser(), True)]
    return [(Path(USER_DIR).expanduser() / "identity", False), (Path(cfg.data_dir) / ADMIN_IDENTITY, False)]


def find_identity(args: argparse.Namespace, cfg: Config) -> auth.Identity | None:
    """The operator identity to sign with; None when there is none to use."""
    # Imported here: signing (nacl) is not needed by commands that send no control request.
    from .. import auth
    from ..keyfiles import read_identity
    for path, required in _identity_candidates(args, cfg):
        if not required and not readable(path):
            continue
        try:
            return read_identity(path)
        except OSError as exc:
            raise CliError(f"cannot read operator identity {path}: {exc.strerror}") from None
        except auth.AuthError as exc:
            raise CliError(str(exc)) from None
    return None


class _Signer:
    """Finds the identity on first use, so commands that send no request never need one."""

    def __init__(self, args: argparse.Namespace, cfg: Config) -> None:
        self.args, self.cfg = args, cfg
        self.loaded = False
        self.identity: auth.Identity | None = None

    def headers(self, subject: str, payload: bytes) -> dict[str, str] | None:
        if not self.loaded:
            self.identity = find_identity(self.args, self.cfg)
            self.loaded = True
        if self.identity is None:
            return None
        from .. import auth

        return auth.sign_request(self.identity, subject, payload, time.time())


_signers: weakref.WeakKeyDictionary[Client, _Signer] = weakref.WeakKeyDictionary()


async def open_client(args: argparse.Namespace) -> Client:
    cfg = config_from(args)
    seed = nats_seed_file(args, cfg)
    try:
        nc = await connect(cfg.nats_urls, "ringfence-cli", retry_forever=False, connect_timeout=2.0, nkey_seed=seed,
                           tls_ca=nats_tls_ca(cfg))
    except NatsCredentialError as exc:
        raise CliError(f"{exc}; pass the cli NATS credential with --nats-nkey or {ENV_NATS_NKEY}") from None
    except (NoServersError, OSError, TimeoutError) as exc:
        raise CliError(
            f"cannot reach NATS at {cfg.nats_url} ({exc.__class__.__name__}); "
            "is the stack running (`ringfence up`)? Use --nats-url or RINGFENCE_NATS_URL to point elsewhere"
        ) from None
    except NatsError as exc:
        if not is_authorization_error(exc):
            raise
        used = f"the credential {seed}" if seed else "no credentials"
        raise CliError(
            f"NATS at {cfg.nats_url} refused the connection with {used} (authorization violation): pass the "
            f"cli NATS credential with --nats-nkey or {ENV_NATS_NKEY} (`ringfence up` keeps it in "
            f"<data_dir>/{CLI_NATS_SEED})"
        ) from None
    _signers[nc] = _Signer(args, cfg)
    return nc


async def call(nc: Client, subject: str, body: Any, result_type: type[T], timeout: float = REQUEST_TIMEOUT) -> T:
    """Send a signed request; return the decoded result or raise CliError with the service's message."""
    payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
    signer = _signers.get(nc)
    headers = signer.headers(subject, payload) if signer else None
    try:
        msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
    except NoRespondersError:
        service = subject.split(".")[2] if subject.count(".") >= 2 else subject
        raise CliError(
            f"no {service} service is running (nothing answers {subject}); start it or run `ringfence up`"
        ) from None
    except NatsTimeout:
        raise CliError(f"no reply on {subject} within {timeout:.0f}s; check `ringfence status`") from None
    from ..contract.api import ApiReply

    reply = msgspec.json.decode(msg.data, type=ApiReply)
    if not reply.ok:
        raise CliError(reply.error)
    return msgspec.json.decode(reply.result, type=result_type)
