"""`ringfence`: one command for operators and for starting everything locally."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys

from .. import __version__
from ..config import ConfigError
from . import commands
from .client import CliError


def build_parser() -> argparse.ArgumentParser:
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
    )
    parser.add_argument("--version", action="version", version=f"ringfence {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands.REGISTRY:
        register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
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
