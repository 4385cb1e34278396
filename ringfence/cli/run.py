"""`ringfence run`: run a command as a Ringfence session on this host."""

from __future__ import annotations

import argparse
import os
import pwd
import socket
import sys

import msgspec

from ..contract.api import OpenSessionReply, OpenSessionRequest
from .client import CliError, config_from

MAX_REPLY = 64 * 1024


def enforcer_socket(data_dir: str) -> str:
    return os.path.join(data_dir, "enforcer.sock")


def open_session(path: str, req: OpenSessionRequest, timeout: float = 30.0) -> str:
    """Ask the local enforcer to put this process into a new session; returns the sid."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(msgspec.json.encode(req) + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REPLY:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise CliError(f"no enforcer socket at {path}; is the enforcer running on this host?") from None
    except OSError as exc:
        raise CliError(f"cannot talk to the enforcer at {path}: {exc.strerror or exc}") from None
    try:
        reply = msgspec.json.decode(data, type=OpenSessionReply)
    except msgspec.DecodeError:
        raise CliError(f"the enforcer at {path} sent no valid reply") from None
    if not reply.ok:
        raise CliError(reply.error)
    return reply.sid


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
    cfg = config_from(args)
    req = OpenSessionRequest(
        user=args.user or "",
        login=args.login or "",
        command=command,
        interactive=sys.stdin.isatty(),
        addr_remote=os.environ.get("SSH_CLIENT", "").replace(" ", ":", 1).split(" ")[0],
    )
    sid = open_session(args.socket or enforcer_socket(cfg.data_dir), req)
    os.environ["RINGFENCE_SESSION_ID"] = sid
    if os.geteuid() == 0 and args.login and args.login != pwd.getpwuid(0).pw_name:
        become(args.login)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        raise CliError(f"cannot run {command[0]}: {exc.strerror}", exit_code=127) from None


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a command as a restricted session on this host",
        description="Ask the local enforcer to open a session (its own cgroup, with network "
        "restrictions, locks and audit), then run CMD inside it. Root may name any --user and "
        "--login (and runs CMD as that login); other accounts only open sessions for themselves.",
    )
    p.add_argument("--user", help="Ringfence user the session belongs to (default: the login)")
    p.add_argument("--login", help="OS login of the session (default: the calling account)")
    p.add_argument("--socket", help="enforcer socket (default: <data_dir>/enforcer.sock)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run)
