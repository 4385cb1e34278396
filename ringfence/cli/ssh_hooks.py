"""`ringfence hooks`: the exact sshd and PAM lines that wire OpenSSH to this
installation (see README "OpenSSH"). The hooks themselves are
ringfence/hooks/pam_hook.py and ssh_session.py: standard library only, run
with `python3 -I -S` so that nothing from a user's environment reaches them."""

from __future__ import annotations

import argparse
import os
import sys

from .. import node_setup
from .client import config_from


def interpreter() -> str:
    """A Python 3.11+ every account can run (the venv's base interpreter)."""
    return os.path.realpath(sys.executable)


def force_command(data_dir: str) -> str:
    return node_setup.force_command(interpreter(), data_dir)


def pam_line(data_dir: str) -> str:
    return node_setup.pam_line(interpreter(), data_dir)


def show(args: argparse.Namespace) -> int:
    data_dir = config_from(args).data_dir
    print("# sshd: with examples/sshd_config.d/ringfence.conf, in /etc/ssh/sshd_config.d/")
    print(force_command(data_dir))
    print("# PAM, in /etc/pam.d/sshd right after '@include common-session' (after pam_systemd, before any pam_env)")
    print(pam_line(data_dir))
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("hooks", parents=[common], help="print the sshd and PAM lines for this installation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=show)
