"""`ringfence users add|ls|rm`: Ringfence users, their roles and SSH keys.

An SSH login belongs to the user named by its certificate's key ID, else to
the user whose registered public key it used, else to the login name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from ..contract import names
from ..contract.api import CreateRequest, CreateResult, DeleteRequest, DeleteResult, GetRequest
from ..contract.resources import Metadata, User, UserSpec
from .client import CliError, call, open_client


def _read_key(path: str) -> str:
    try:
        text = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read public key {path}: {exc.strerror}") from None
    parts = text.split()
    if len(parts) < 2 or not (parts[0].startswith(("ssh-", "ecdsa-", "sk-"))):
        raise CliError(f"{path} is not an OpenSSH public key (expected e.g. 'ssh-ed25519 AAAA... comment')")
    return " ".join(parts[:3])


async def run_add(args: argparse.Namespace) -> int:
    roles = [r for r in (args.roles or "").split(",") if r]
    user = User(metadata=Metadata(name=args.name),
                spec=UserSpec(roles=roles, ssh_public_keys=[_read_key(k) for k in args.key or []]))
    nc = await open_client(args)
    try:
        req = CreateRequest(resources=[msgspec.Raw(msgspec.json.encode(user))])
        result = await call(nc, names.api_subject(names.POLICY_API, "create"), req, CreateResult)
    finally:
        await nc.close()
    for line in result.messages:
        print(line)
    return 0


async def run_ls(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        users = await call(nc, names.api_subject(names.POLICY_API, "get"), GetRequest(kind="user"), list[User])
    finally:
        await nc.close()
    rows = [("USER", "ROLES", "SSH KEYS")]
    rows += [(u.metadata.name, ",".join(u.spec.roles) or "-", str(len(u.spec.ssh_public_keys))) for u in users]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def run_rm(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        req = DeleteRequest(kind="user", name=args.name)
        result = await call(nc, names.api_subject(names.POLICY_API, "delete"), req, DeleteResult)
    finally:
        await nc.close()
    print(result.message)
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("users", help="manage Ringfence users", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_subparsers(dest="users_command", metavar="SUBCOMMAND", required=True)
    add = group.add_parser("add", parents=[common], help="create or update a user")
    add.add_argument("name")
    add.add_argument("--roles", help="comma-separated role names")
    add.add_argument("--key", action="append", metavar="PUBKEY_FILE",
                     help="an OpenSSH public key file that identifies this user (repeatable)")
    add.set_defaults(func=run_add)
    ls = group.add_parser("ls", parents=[common], help="list users")
    ls.set_defaults(func=run_ls)
    rm = group.add_parser("rm", parents=[common], help="delete a user")
    rm.add_argument("name")
    rm.set_defaults(func=run_rm)
