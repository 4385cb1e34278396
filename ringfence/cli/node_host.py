"""`ringfence node join|install|uninstall`: make this host a node of a fleet."""

from __future__ import annotations

import argparse

from . import fleet, node_install


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("node", help="make this host a node: join a fleet, install or remove the OpenSSH hooks")
    group = p.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)
    fleet.register_node(group, common)
    node_install.register(group, common)
