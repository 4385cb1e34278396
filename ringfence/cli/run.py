"""`ringfence run`: run a command as a Ringfence session on this host."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil

from ..contract.api import OpenSessionRequest
from .client import CliError, config_from
from .enforcer_link import EnforcerLink, socket_path
from .ptyproxy import run_plain, run_with_pty, window_size


def become(login: str) -> None:
    """Root running a session for another login: switch to that account before exec."""
    try:
        pw = pwd.getpwnam(login)
    except KeyError:
        raise CliError(f"no such login {login!r} on this host") from None
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
    try:
        os.chdir(pw.pw_dir)
    except OSError:
        os.chdir("/")


def run(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CliError("no command given: ringfence run [--user U] [--login L] -- CMD [ARGS...]")
    path = shutil.which(command[0])
    if path is None:
        raise CliError(f"command not found: {command[0]}", exit_code=127)
    cfg = config_from(args)
    interactive = os.isatty(0) and os.isatty(1)
    cols, rows = window_size(0) if interactive else (0, 0)
    req = OpenSessionRequest(
        user=args.user or "", login=args.login or "", command=command, interactive=interactive,
        term=os.environ.get("TERM", ""), width=cols, height=rows,
    )
    link = EnforcerLink(args.socket or socket_path(cfg.data_dir))
    reply = link.open(req)
    os.environ["RINGFENCE_SESSION_ID"] = reply.sid
    if os.geteuid() == 0 and args.login and args.login != pwd.getpwuid(0).pw_name:
        become(args.login)
    if interactive:
        return run_with_pty(path, command, link, reply.record)
    return run_plain(path, command, link)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a command as a restricted session on this host",
        description="Ask the local enforcer to open a session (its own cgroup, with network "
        "restrictions, locks and audit), then run CMD inside it; on a terminal the session is "
        "recorded. Root may name any --user and --login (and runs CMD as that login); other "
        "accounts only open sessions for themselves.",
    )
    p.add_argument("--user", help="Ringfence user the session belongs to (default: the login)")
    p.add_argument("--login", help="OS login of the session (default: the calling account)")
    p.add_argument("--socket", help="enforcer socket (default: <data_dir>/enforcer.sock)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run)
