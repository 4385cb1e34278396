"""`ringfence users add|update|ls|rm`: Ringfence users, their roles, SSH keys and operator identity.

`users add` creates a user, or changes an existing one; `users update` changes
an existing one. Either changes only what its flags name: --roles/--set-roles
replace the roles, --key/--add-key add a key, --remove-key removes one (by its
public key file or its SHA256 fingerprint), --operator issues a new operator
identity; everything else the user had is kept.

An SSH login belongs to the user named by its certificate's key ID, else to
the user whose registered public key it used, else to the login name.

`users add NAME --operator` also issues an operator identity: a new ed25519
nkey whose public half becomes the user's spec.operator_nkey and whose seed
is written to ~/.ringfence/NAME.nk (or --out), mode 0600. The CLI signs
control requests with it (--identity FILE, RINGFENCE_IDENTITY, or
~/.ringfence/identity). Issuing a new one replaces the old key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import auth
from ..contract import names
from ..contract.api import CreateResult, DeleteRequest, DeleteResult, GetRequest, UserUpdateRequest
from ..contract.resources import User
from ..keyfiles import write_identity
from .client import USER_DIR, CliError, call, open_client


def _read_key(path: str) -> str:
    try:
        text = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read public key {path}: {exc.strerror}") from None
    parts = text.split()
    if len(parts) < 2 or not (parts[0].startswith(("ssh-", "ecdsa-", "sk-"))):
        raise CliError(f"{path} is not an OpenSSH public key (expected e.g. 'ssh-ed25519 AAAA... comment')")
    return " ".join(parts[:3])


def identity_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out).expanduser()
    if "/" in args.name or args.name.startswith("."):
        raise CliError(f'user name "{args.name}" cannot name a file: choose where the identity goes with --out')
    return Path(USER_DIR).expanduser() / f"{args.name}.nk"


def _issue_identity(args: argparse.Namespace) -> tuple[auth.Identity, Path]:
    """A new operator identity for the user, written (0600) before the user is registered with it."""
    identity = auth.Identity(user=args.name, seed=auth.new_user_seed())
    path = identity_path(args)
    try:
        write_identity(path, identity)
    except FileExistsError:
        raise CliError(f"{path} already exists; remove it or choose another file with --out "
                       "(an identity file is never overwritten)") from None
    except OSError as exc:
        raise CliError(f"cannot write the operator identity to {path}: {exc.strerror}") from None
    return identity, path


def _roles(text: str | None) -> list[str] | None:
    return None if text is None else [r for r in text.split(",") if r]


async def _update(args: argparse.Namespace, request: UserUpdateRequest) -> int:
    if getattr(args, "out", None) and not args.operator:
        raise CliError("--out applies to --operator only")
    nc = await open_client(args)
    issued: tuple[auth.Identity, Path] | None = None
    try:
        if args.operator:
            issued = _issue_identity(args)
            request.operator_nkey = issued[0].public_key
        result = await call(nc, names.api_subject(names.POLICY_API, "update_user"), request, CreateResult)
    except BaseException:
        if issued:  # the user was not registered with it: leave no identity that works nowhere
            issued[1].unlink(missing_ok=True)
        raise
    finally:
        await nc.close()
    for line in result.messages:
        print(line)
    if issued:
        identity, path = issued
        print(f"operator identity of {args.name} ({identity.public_key}) written to {path}")
        print(f"keep it secret; use it with --identity {path}, RINGFENCE_IDENTITY={path}, "
              f"or as {USER_DIR}/identity")
    return 0


async def run_add(args: argparse.Namespace) -> int:
    return await _update(args, UserUpdateRequest(name=args.name, create=True, set_roles=_roles(args.roles),
                                                 add_keys=[_read_key(k) for k in args.key or []]))


async def run_update(args: argparse.Namespace) -> int:
    if args.set_roles is None and not (args.add_key or args.remove_key or args.operator):
        raise CliError("nothing to change: give --set-roles, --add-key, --remove-key or --operator")
    removed = [k if k.startswith("SHA256:") else _read_key(k) for k in args.remove_key or []]
    return await _update(args, UserUpdateRequest(name=args.name, set_roles=_roles(args.set_roles),
                                                 add_keys=[_read_key(k) for k in args.add_key or []],
                                                 remove_keys=removed))


async def run_ls(args: argparse.Namespace) -> int:
    nc = await open_client(args)
    try:
        users = await call(nc, names.api_subject(names.POLICY_API, "get"), GetRequest(kind="user"), list[User])
    finally:
        await nc.close()
    rows = [("USER", "ROLES", "SSH KEYS", "OPERATOR KEY")]
    rows += [(u.metadata.name, ",".join(u.spec.roles) or "-", str(len(u.spec.ssh_public_keys)),
              u.spec.operator_nkey or "-") for u in users]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
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


def _operator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operator", action="store_true",
                   help="issue an operator identity (new nkey) for signing control requests; "
                        "replaces the user's previous one")
    p.add_argument("--out", metavar="PATH",
                   help=f"with --operator: where to write the identity (default {USER_DIR}/NAME.nk; "
                        "never overwritten)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("users", help="manage Ringfence users", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_subparsers(dest="users_command", metavar="SUBCOMMAND", required=True)
    add = group.add_parser("add", parents=[common], help="create a user, or change what the flags name")
    add.add_argument("name")
    add.add_argument("--roles", help="comma-separated role names (replace the user's roles)")
    add.add_argument("--key", action="append", metavar="PUBKEY_FILE",
                     help="add an OpenSSH public key file that identifies this user (repeatable)")
    _operator_flags(add)
    add.set_defaults(func=run_add)
    update = group.add_parser("update", parents=[common], help="change an existing user; keep the rest")
    update.add_argument("name")
    update.add_argument("--set-roles", metavar="R1,R2", help="comma-separated role names (replace the roles)")
    update.add_argument("--add-key", action="append", metavar="PUBKEY_FILE",
                        help="add an OpenSSH public key file (repeatable)")
    update.add_argument("--remove-key", action="append", metavar="PUBKEY_FILE|SHA256:...",
                        help="remove a key, named by its public key file or its fingerprint (repeatable)")
    _operator_flags(update)
    update.set_defaults(func=run_update)
    ls = group.add_parser("ls", parents=[common], help="list users")
    ls.set_defaults(func=run_ls)
    rm = group.add_parser("rm", parents=[common], help="delete a user")
    rm.add_argument("name")
    rm.set_defaults(func=run_rm)
