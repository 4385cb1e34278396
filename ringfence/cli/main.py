"""`ringfence`: one command for operators and for starting everything locally."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys

from .. import __version__
from ..config import ConfigError
from . import commands, startup  # startup: before .client imports nats-py
from .client import CliError

_ = startup

# Options every command takes (and --format, where a command has it). They may come before the
# command as well as after it: `ringfence --identity F lock ...` is `ringfence lock --identity F ...`.
GLOBAL_OPTIONS = ("--config", "--nats-url", "--data-dir", "--nats-nkey", "--identity", "--format")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def leading_options(argv: list[str]) -> int:
    """How many of argv's first arguments are global options (with their values)."""
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in GLOBAL_OPTIONS:
        i += 1 if "=" in argv[i] else 2
    return min(i, len(argv))


def hoist_global_options(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Move global options written before the command to just after it (after a group's
    subcommand too, e.g. `users add`), where the command's parser reads them."""
    n = leading_options(argv)
    if not n:
        return argv
    leading, rest = argv[:n], argv[n:]
    depth, current = 0, parser
    while depth < len(rest) and rest[depth] in (choices := _subcommands(current)):
        current = choices[rest[depth]]
        depth += 1
    depth = max(depth, min(1, len(rest)))  # an unknown command is reported as such, not as its option
    return rest[:depth] + leading + rest[depth:]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone (see commands.py), or for every command."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--config", help="YAML config file (default: /etc/ringfence.yaml when present)")
    group.add_argument("--nats-url", help="NATS URL(s), comma-separated (env RINGFENCE_NATS_URL)")
    group.add_argument("--data-dir", help="data directory (env RINGFENCE_DATA_DIR, default /var/lib/ringfence)")
    group.add_argument("--nats-nkey", metavar="SEED_FILE",
                       help="NATS nkey seed to connect with (env RINGFENCE_NATS_NKEY; default "
                            "<data_dir>/nats/cli.nk when readable)")
    group.add_argument("--identity", metavar="FILE",
                       help="operator identity that signs control requests (env RINGFENCE_IDENTITY; default "
                            "~/.ringfence/identity, else <data_dir>/admin.nk when readable)")

    parser = argparse.ArgumentParser(
        prog="ringfence",
        description="Session controls for OpenSSH fleets: egress restrictions, locks, limits, audit.",
        epilog="Connection options (--config, --data-dir, --nats-url, --nats-nkey, --identity) and --format "
        "may be given before or after the command. `ringfence COMMAND -h` lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ringfence {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(sub, common, command)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    n = leading_options(argv)
    parser = build_parser(argv[n] if n < len(argv) else None)
    args = parser.parse_args(hoist_global_options(argv, parser))
    try:
        result = args.func(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
    except (CliError, ConfigError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(result or 0)


if __name__ == "__main__":
    main()
