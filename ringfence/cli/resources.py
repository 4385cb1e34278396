"""`ringfence create -f`, `ringfence get`, `ringfence rm`: resources in the policy and locks services.

The CLI only reads YAML, routes documents by kind and prints what the services
answer; every check on the content happens in the service that owns the kind.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import msgspec
import yaml
from nats.aio.client import Client

from ..contract import api, names, resources
from ..contract.strict import visible
from .client import CliError, call, open_client

MAX_FILE_BYTES = 16 * 1024 * 1024  # the services refuse larger requests anyway
# YAML aliases repeat a part of the file wherever they are used; what the documents
# expand to (as JSON) is bounded too, or a few lines could make gigabytes.
MAX_EXPANDED_BYTES = 64 * 1024 * 1024  # NATS's largest possible max_payload
STDIN = "-"
NAMED_KINDS = ("role", "user", "lock")  # the other kinds are one per cluster
FORMATS = ("yaml", "json", "text")


# --- reading documents ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    file: str  # as given on the command line ("-" reads as <stdin>)
    position: int  # 1-based among the file's non-empty documents
    doc: Any


# libyaml's parser when PyYAML was built with it: large CIDR lists parse ~10x faster.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """PyYAML keeps the last of two equal keys; in a policy file a second `allow:`
    would silently drop the first list, so a duplicate key is an error instead."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key (`? [a, b]`)
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {type(key).__name__} cannot be a key", key_node.start_mark
                ) from None
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {json.dumps(key, default=str)}", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read(path: str) -> tuple[str, bytes]:
    label = "<stdin>" if path == STDIN else path
    try:
        if path == STDIN:
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {label}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CliError(f"{label} is larger than {MAX_FILE_BYTES >> 20} MiB; split it into several files")
    return label, data


def parse_documents(label: str, data: bytes, allow_lists: bool = False) -> list[Source]:
    """The non-empty YAML documents in `data` (separated by ---); with `allow_lists`, a document
    may also be a list of them (JSON exports)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{label}: not UTF-8 text (byte {exc.start})") from None
    try:
        docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark else label
        raise CliError(f"{where}: YAML syntax error: {visible(str(exc.problem or exc.context))}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{label}: YAML syntax error: {visible(str(exc))}") from None
    except RecursionError:
        raise CliError(f"{label}: YAML nested too deeply") from None
    sources = []
    expanded = 0
    for doc in (d for d in docs if d is not None):
        position = len(sources) + 1
        if not isinstance(doc, dict) and not (allow_lists and isinstance(doc, list)):
            raise CliError(f"{label}: document {position} is a {type(doc).__name__}, not a resource "
                           "(kind, version, metadata, spec)")
        expanded += json_size(doc, MAX_EXPANDED_BYTES - expanded, f"{label}: document {position}")
        sources.append(Source(label, position, doc))
    return sources


def json_size(doc: Any, limit: int, what: str) -> int:
    """About how many bytes `doc` takes as JSON, counting a part shared through YAML
    aliases once per use; CliError when that passes `limit` or a part contains itself."""
    sizes: dict[int, int] = {}  # containers already measured (aliases share them)
    open_: set[int] = set()  # containers being measured: meeting one again is a cycle

    def size(value: Any) -> int:
        if isinstance(value, str):
            return len(value) + 2
        if isinstance(value, bytes):
            return len(value) * 4 // 3 + 6
        if not isinstance(value, (dict, list, set, tuple)):
            return 24  # numbers, booleans, null, dates
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise CliError(f"{what} contains itself (a YAML alias inside its own anchor)")
        open_.add(key)
        items = value.items() if isinstance(value, dict) else value
        total = 2
        for item in items:
            total += (size(item[0]) + size(item[1]) + 2) if isinstance(value, dict) else size(item) + 1
            if total > limit:
                raise CliError(f"{what} is more than {MAX_EXPANDED_BYTES >> 20} MiB once its YAML aliases are "
                               "expanded, together with the documents before it")
        open_.discard(key)
        sizes[key] = total
        return total

    try:
        return size(doc)
    except RecursionError:
        raise CliError(f"{what} is nested too deeply") from None


def load_sources(paths: list[str]) -> list[Source]:
    if paths.count(STDIN) > 1:
        raise CliError("- (standard input) can be given only once")
    sources = [s for path in paths for s in parse_documents(*_read(path))]
    if not sources:
        shown = ["<stdin>" if p == STDIN else p for p in paths]
        raise CliError(f"no documents found in {', '.join(shown)}")
    return sources


# --- create -------------------------------------------------------------------------------


def service_api(kind: str) -> str:
    return names.LOCKS_API if kind in resources.LOCK_KINDS else names.POLICY_API


def route(sources: list[Source]) -> dict[str, list[Source]]:
    """Documents per service API, in the order given. Unknown kinds go to the
    policy service, whose strict decoding names the bad value."""
    batches: dict[str, list[Source]] = {}
    for s in sources:
        batches.setdefault(service_api(str(s.doc.get("kind", ""))), []).append(s)
    return batches


_DOCUMENT_REF = re.compile(r"^document (\d+)\b", re.MULTILINE)


def renumber(error: str, batch: list[Source], several_files: bool) -> str:
    """A service numbers the documents of its own request; point at the user's files instead."""

    def replace(m: re.Match) -> str:
        i = int(m.group(1)) - 1
        if not 0 <= i < len(batch):
            return m.group(0)
        s = batch[i]
        return f"{s.file}: document {s.position}" if several_files else f"document {s.position}"

    return _DOCUMENT_REF.sub(replace, error)


def _request_bytes(nc: Client, batch: list[Source], dry_run: bool) -> bytes:
    raws = []
    for s in batch:
        try:
            raws.append(msgspec.Raw(msgspec.json.encode(s.doc)))
        except (TypeError, ValueError, msgspec.EncodeError) as exc:  # e.g. a key that is not a string
            raise CliError(f"{s.file}: document {s.position} cannot be sent as JSON: {visible(str(exc))}") from None
        except RecursionError:
            raise CliError(f"{s.file}: document {s.position} is nested too deeply") from None
    payload = msgspec.json.encode(api.CreateRequest(resources=raws, dry_run=dry_run))
    if len(payload) > nc.max_payload:
        raise CliError(
            f"the request is {len(payload)} bytes; the NATS server accepts at most {nc.max_payload} per message "
            "(max_payload): send fewer documents at a time, or raise max_payload in the NATS server's configuration"
        )
    return payload


async def _send(nc: Client, api_name: str, batch: list[Source], dry_run: bool, several_files: bool) -> list[str]:
    payload = _request_bytes(nc, batch, dry_run)
    try:
        result = await call(nc, names.api_subject(api_name, "create"), payload, api.CreateResult)
    except CliError as exc:
        raise CliError(renumber(str(exc), batch, several_files), exc.exit_code) from None
    return result.messages


def print_messages(messages: list[str]) -> None:
    for line in messages:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)


async def apply(nc: Client, sources: list[Source], dry_run: bool, several_files: bool) -> list[str]:
    """Send the documents to the services that own them; their messages. Each service checks all of
    its documents before changing anything; when a request spans services, a dry run of every batch
    first keeps that promise across them: a bad lock document also stops the policy changes."""
    batches = route(sources)
    if len(batches) > 1 or dry_run:
        messages = [m for api_name, batch in batches.items()
                    for m in await _send(nc, api_name, batch, True, several_files)]
        if dry_run:
            return messages
    messages, applied = [], 0
    for api_name, batch in batches.items():
        try:
            messages += await _send(nc, api_name, batch, False, several_files)
        except CliError as exc:
            if applied:  # only a race or an outage gets here after a clean dry run
                print_messages(messages)
                raise CliError(f"{exc}\nthe documents reported above were applied; the rest were not") from None
            raise
        applied += len(batch)
    return messages


async def create(args: argparse.Namespace) -> int:
    sources = load_sources(args.files)
    nc = await open_client(args)
    try:
        print_messages(await apply(nc, sources, False, len(args.files) > 1))
    finally:
        await nc.close()
    return 0


# --- get and rm -----------------------------------------------------------------------------


def parse_target(target: str, name: str | None) -> tuple[str, str]:
    """`roles/locksmith`, `roles locksmith` or `cap` -> (canonical kind, name)."""
    kind_text, slash, slash_name = target.partition("/")
    if slash and name:
        raise CliError(f"give the name once: {target} or {kind_text} {name}")
    kind = resources.KIND_ALIASES.get(kind_text)
    if kind is None:
        raise CliError(f'unknown kind "{kind_text}"; use one of {", ".join(resources.KIND_ALIASES)}')
    return kind, slash_name or name or ""


async def _request(args: argparse.Namespace, verb: str, body: Any, result_type: type) -> Any:
    nc = await open_client(args)
    try:
        return await call(nc, names.api_subject(service_api(body.kind), verb), body, result_type)
    finally:
        await nc.close()


async def get(args: argparse.Namespace) -> int:
    kind, name = parse_target(args.target, args.name)
    docs = await _request(args, "get", api.GetRequest(kind=kind, name=name), list[Any])
    if args.format == "json":
        print(json.dumps(docs, indent=2, ensure_ascii=False))
    elif args.format == "yaml":
        if docs:
            print(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True), end="")
        else:  # on stderr: what stdout holds stays exactly what `create -f` reads back
            print(nothing_found(kind), file=sys.stderr)
    else:
        print_text(kind, docs)
    return 0


async def rm(args: argparse.Namespace) -> int:
    kind, name = parse_target(args.target, args.name)
    if kind in NAMED_KINDS and not name:
        raise CliError(f"name the {kind} to remove: ringfence rm {PLURALS[kind]}/NAME")
    result = await _request(args, "delete", api.DeleteRequest(kind=kind, name=name), api.DeleteResult)
    print(result.message)
    return 0


PLURALS = {"role": "roles", "user": "users", "lock": "locks"}


# --- text tables ------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns under an underlined header, as the original's tables look."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(" ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _rows(kind: str, items: list[Any]) -> tuple[list[str], list[list[str]]]:
    if kind == "lock":
        return ["ID", "Target", "Message", "Expires"], [
            [x.metadata.name, x.spec.target.describe(), x.spec.message, x.spec.expires or "never"] for x in items
        ]
    if kind == "role":
        header = ["Role", "Logins", "Lock", "Max Connections", "Max Sessions", "Client Idle Timeout"]
        return header, [
            [x.metadata.name, ",".join(x.spec.allow.logins), x.spec.options.lock or "",
             str(x.spec.options.max_connections or ""), str(x.spec.options.max_sessions or ""),
             x.spec.options.client_idle_timeout]
            for x in items
        ]
    if kind == "user":
        return ["User", "Roles", "SSH Keys"], [
            [x.metadata.name, ",".join(x.spec.roles), str(len(x.spec.ssh_public_keys))] for x in items
        ]
    if kind == "network_restrictions":
        return ["List", "CIDR"], [
            [list_name, rule.cidr] for x in items for list_name in ("allow", "deny")
            for rule in getattr(x.spec, list_name)
        ]
    if kind == "cluster_auth_preference":
        return ["Locking Mode"], [[x.spec.locking_mode] for x in items]
    if kind == "session_recording_config":
        return ["Mode"], [[x.spec.mode] for x in items]
    return ["Client Idle Timeout"], [[x.spec.client_idle_timeout or "none"] for x in items]


def nothing_found(kind: str) -> str:
    if kind == "network_restrictions":
        return "no network restrictions: every destination is allowed"
    return f"no {PLURALS.get(kind, kind)} found"


def print_text(kind: str, docs: list[Any]) -> None:
    if kind == "network_restrictions" and not docs:  # other kinds: the table's header, no rows
        print(nothing_found(kind))
        return
    try:
        items = [msgspec.convert(d, resources.AnyResource) for d in docs]
    except msgspec.ValidationError as exc:
        raise CliError(f"cannot show the reply as a table ({exc}); use --format yaml") from None
    header, rows = _rows(kind, items)
    print(table(header, rows))


# --- registration --------------------------------------------------------------------------------

KINDS_HELP = "KIND is one of: " + ", ".join(resources.KIND_ALIASES)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "create",
        parents=[common],
        help="create or update resources from YAML files",
        description="Create or update the resources in YAML files (several documents per file, separated by "
        "---). Every document is checked before anything changes: one bad document and nothing is applied. "
        "An existing resource of the same kind and name is replaced.",
    )
    p.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE",
                   help="YAML file to read; - reads standard input; repeat for several files")
    p.set_defaults(func=create)

    p = sub.add_parser(
        "get",
        parents=[common],
        help="show resources",
        description="Show resources: `get KIND`, `get KIND/NAME` or `get KIND NAME`. " + KINDS_HELP + ". "
        "The default format is yaml, which `ringfence create -f` reads back; text prints a table.",
    )
    p.add_argument("target", metavar="KIND[/NAME]")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--format", choices=FORMATS, default="yaml", help="output format (default: yaml)")
    p.set_defaults(func=get)

    p = sub.add_parser(
        "rm",
        parents=[common],
        help="remove a resource",
        description="Remove a resource: `rm KIND/NAME` or `rm KIND NAME` for roles, users and locks; "
        "`rm network_restrictions` (and cap, networking) resets to the defaults. " + KINDS_HELP + ".",
    )
    p.add_argument("target", metavar="KIND[/NAME]")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.set_defaults(func=rm)
