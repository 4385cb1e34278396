"""`ringfence import FILE`: load the original's exported resources (`tctl get all`).

The documents are translated (ringfence/migrate.py) and sent as `create -f`
sends them: every document is checked by the service that owns it before
anything changes, so one the services refuse means nothing is imported.
What does not carry over is printed, never dropped silently.
"""

from __future__ import annotations

import argparse
import sys

from ..contract import api, names
from ..contract.resources import User
from ..migrate import merge_existing_users, translate
from .client import call, open_client
from .resources import STDIN, Source, _read, apply, parse_documents, print_messages


def _flatten(sources: list[Source]) -> list[tuple[int, object]]:
    """`tctl get all --format json` writes one list; YAML streams one document each."""
    docs: list[tuple[int, object]] = []
    for s in sources:
        items = s.doc if isinstance(s.doc, list) else [s.doc]
        docs += [(len(docs) + 1, item) for item in items]
    return docs


async def run(args: argparse.Namespace) -> int:
    label, data = _read(args.file)
    translation = translate(_flatten(parse_documents(label, data, allow_lists=True)))
    nc = await open_client(args)
    try:
        existing = await call(nc, names.api_subject(names.POLICY_API, "get"), api.GetRequest(kind="user"), list[User])
        notes = translation.notes + merge_existing_users(translation.docs, {u.metadata.name: u for u in existing})
        sources = [Source(label, position, doc) for position, doc in translation.docs]
        messages = await apply(nc, sources, args.dry_run, False) if sources else []
    finally:
        await nc.close()
    prefix = "(dry run) " if args.dry_run else ""
    print_messages([prefix + m if not m.startswith("warning:") else m for m in messages])
    for line in notes:
        print(f"note: {line}")
    for reason, labels in translation.skipped.items():
        print(f"skipped {len(labels)} ({reason}): {', '.join(labels)}")
    print(f"{'dry run: nothing was changed; ' if args.dry_run else ''}{len(sources)} of "
          f"{len(sources) + sum(map(len, translation.skipped.values()))} documents "
          f"{'would be ' if args.dry_run else ''}imported", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "import",
        parents=[common],
        help="import the original's exported resources (tctl get all)",
        description="Import the output of `tctl get all` (or `tctl get roles,users,locks,network_restrictions,"
        "cap`): roles v3-v7, users, locks, network restrictions and the cluster settings Ringfence has. "
        "Everything is checked first: one document the services refuse and nothing is imported. Fields "
        "and documents that do not carry over are listed. Users Ringfence already has keep their SSH keys, "
        "operator identity and roles.",
    )
    p.add_argument("file", metavar="FILE", help=f"the exported YAML (or JSON) stream; {STDIN} reads standard input")
    p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    p.set_defaults(func=run)
