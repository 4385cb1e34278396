"""The first administrator: role `admin` (every verb on every resource) and user `admin`
with an operator identity whose seed is kept in <data_dir>/admin.nk (0600).

`ringfence up` does this before the services start, writing the policy bucket
directly (nobody could sign a request to the policy service yet). It happens
once per cluster: only while user `admin` has never existed in the bucket. A
deleted admin stays deleted (the key's delete marker says it existed), and a
second node sharing the NATS finds the user and leaves it alone.
"""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError

from .. import auth
from ..config import Config
from ..contract import names
from ..contract import resources as r
from ..contract.events import AuditEvent, RoleCreated, UserCreated
from ..contract.streams import StreamSetupError, ensure_streams_ready
from ..keyfiles import read_identity, write_identity
from ..runtime.audit_publish import publish_event
from ..runtime.service import server_id_for
from .client import CliError, config_from, open_client

log = logging.getLogger(__name__)

ADMIN = "admin"
ADMIN_IDENTITY_FILE = "admin.nk"
BOOTSTRAP_ACTOR = "ringfence-up"


class BootstrapError(Exception):
    pass


def admin_role() -> r.Role:
    return r.Role(
        version="v5",
        metadata=r.Metadata(name=ADMIN, description="every verb on every resource (created by ringfence up)"),
        spec=r.RoleSpec(allow=r.RoleConditions(rules=[r.Rule(resources=[auth.WILDCARD], verbs=[auth.WILDCARD])])),
    )


def admin_identity_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / ADMIN_IDENTITY_FILE


def _identity_for(path: Path) -> auth.Identity:
    """The admin identity in `path` (left by an interrupted bootstrap), else a new one written there."""
    if path.exists():
        try:
            identity = read_identity(path)
        except (OSError, auth.AuthError) as exc:
            raise BootstrapError(f"{path} exists but is not a usable operator identity ({exc}); move it away") \
                from None
        if identity.user != ADMIN:
            raise BootstrapError(f'{path} is the identity of user "{identity.user}", not "{ADMIN}"; move it away')
        return identity
    identity = auth.Identity(user=ADMIN, seed=auth.new_user_seed())
    write_identity(path, identity)
    return identity


async def _create(kv, key: str, value: bytes) -> bool:
    """Write `key` only if it never existed (no value, no delete marker); False when it did."""
    try:
        await kv.update(key, value, last=0)
    except KeyWrongLastSequenceError:
        return False
    return True


async def bootstrap_admin(js: JetStreamContext, cfg: Config) -> Path | None:
    """Create the admin role and user when the cluster has none; the identity file, or None."""
    kv = await js.key_value(names.POLICY_BUCKET)
    try:
        await kv.get(names.user_key(ADMIN))
        return None  # bootstrapped before
    except KeyDeletedError:
        return None  # deleted by an operator: not brought back
    except KeyNotFoundError as exc:
        if exc.entry is not None:  # nats-py reports a delete marker this way too
            return None
    path = admin_identity_path(cfg.data_dir)
    existed = path.exists()
    identity = _identity_for(path)
    role_created = await _create(kv, names.role_key(ADMIN), r.encode(admin_role()))
    user = r.User(metadata=r.Metadata(name=ADMIN), spec=r.UserSpec(roles=[ADMIN], operator_nkey=identity.public_key))
    if not await _create(kv, names.user_key(ADMIN), r.encode(user)):
        if not existed:  # another node bootstrapped meanwhile; its identity is the one
            path.unlink(missing_ok=True)
        return None
    events: list[AuditEvent] = [UserCreated(name=ADMIN, roles=[ADMIN])]
    if role_created:
        events.insert(0, RoleCreated(name=ADMIN))
    try:
        server_id = server_id_for(cfg.data_dir)
    except OSError:
        server_id = ""
    for event in events:
        event.user = BOOTSTRAP_ACTOR
        event.cluster_name = cfg.cluster_name
        event.server_id = server_id
        event.server_hostname = socket.gethostname()
        try:
            await publish_event(js, event)
        except Exception as exc:  # the admin exists either way; the audit log misses its creation
            log.warning("bootstrap: audit event %s not published: %r", event.event_type(), exc)
    return path


async def run(args: argparse.Namespace) -> int:
    """`ringfence bootstrap`: the same as `ringfence up` does, for stacks started otherwise (compose)."""
    cfg = config_from(args)
    nc = await open_client(args)
    try:
        js = nc.jetstream()
        try:
            await ensure_streams_ready(js, cfg.nats_replicas, timeout=30)
            path = await bootstrap_admin(js, cfg)
        except (BootstrapError, StreamSetupError) as exc:
            raise CliError(str(exc)) from None
        except NatsTimeout:
            raise CliError("NATS did not answer: is this NATS credential allowed to write the policy bucket? "
                           "(`ringfence up` keeps one in <data_dir>/nats/up.nk: --nats-nkey)") from None
    finally:
        await nc.close()
    if path is None:
        print(f'user "{ADMIN}" exists (or was deleted): nothing to do')
    else:
        print(f"bootstrap admin identity: {path}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bootstrap",
        parents=[common],
        help="create the first admin (role and user admin, identity in <data_dir>/admin.nk)",
        description=__doc__ + "\n`ringfence up` bootstraps by itself; run this for a stack started otherwise "
        "(compose). The NATS credential must be allowed to write the policy bucket.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)
