"""`ringfence lock` and `ringfence unlock`: place locks and lift them by target.

`get locks` and `rm locks/NAME` live with the other resources (resources.py).
Every check happens in the locks service; this module only builds requests
and prints the answers.
"""

from __future__ import annotations

import argparse
import sys

from ..contract import api, names
from ..contract.resources import LOCK_TARGET_FIELDS, LockTarget
from .client import CliError, call, open_client

TARGET_HELP = {
    "user": "a user, by name",
    "role": "every user holding this role",
    "login": "an OS/UNIX login",
    "server_id": "a node, by its server UUID",
    "mfa_device": "a FIDO security key (sk-*), by its SHA256 fingerprint as `ssh-keygen -lf KEY.pub` prints it",
    "device": "an SSH key and its certificates, by its SHA256 fingerprint as `ssh-keygen -lf KEY.pub` prints it",
    "access_request": "(refused: OpenSSH sessions have no access requests)",
    "windows_desktop": "(refused: Ringfence controls OpenSSH sessions only)",
}


def text_flag(args: argparse.Namespace, field: str) -> str:
    """A flag's value; bytes that are not UTF-8 (which Python carries as surrogates) are an error."""
    value = getattr(args, field) or ""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise CliError(f"--{field.replace('_', '-')}: not valid UTF-8 text") from None
    return value


def target_of(args: argparse.Namespace) -> LockTarget:
    return LockTarget(**{f: text_flag(args, f) for f in LOCK_TARGET_FIELDS})


def print_lines(text: str) -> None:
    for line in text.splitlines():
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)


async def _call(args: argparse.Namespace, verb: str, body, result_type):
    nc = await open_client(args)
    try:
        return await call(nc, names.api_subject(names.LOCKS_API, verb), body, result_type)
    finally:
        await nc.close()


async def lock(args: argparse.Namespace) -> int:
    request = api.LockRequest(target=target_of(args), message=text_flag(args, "message"),
                              ttl=text_flag(args, "ttl"), expires=text_flag(args, "expires"))
    result = await _call(args, "lock", request, api.LockResult)
    print_lines(result.message)
    return 0


async def unlock(args: argparse.Namespace) -> int:
    result = await _call(args, "unlock", api.UnlockRequest(target=target_of(args)), api.UnlockResult)
    print_lines(result.message)
    return 0


def _target_flags(p: argparse.ArgumentParser, verb: str) -> None:
    group = p.add_argument_group("target (one or more)")
    for field in LOCK_TARGET_FIELDS:
        group.add_argument("--" + field.replace("_", "-"), dest=field, metavar="VALUE",
                           help=f"{verb} {TARGET_HELP[field]}")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "lock",
        parents=[common],
        help="lock out a user, role, login, node or device",
        description="Create a lock: sessions matching any of its targets are terminated and new ones are "
        "rejected while it is in force. Without --ttl or --expires it lasts until removed with "
        "`ringfence rm locks/NAME` or `ringfence unlock`.",
    )
    _target_flags(p, "lock")
    p.add_argument("--message", help="what users hitting the lock are told")
    p.add_argument("--ttl", help="how long the lock lasts, e.g. 10h or 90m")
    p.add_argument("--expires", metavar="TIME", help="when the lock ends, RFC 3339 (2021-08-14T22:27:00Z)")
    p.set_defaults(func=lock)

    p = sub.add_parser(
        "unlock",
        parents=[common],
        help="remove the locks on a target",
        description="Remove every lock in force whose target is exactly the one given, e.g. "
        "`ringfence unlock --user alice`. To remove one lock by name use `ringfence rm locks/NAME`.",
    )
    _target_flags(p, "unlock")
    p.set_defaults(func=unlock)
