"""`ringfence run`: run a command as a Ringfence session on this host."""

from __future__ import annotations

import argparse
import os
import signal

from ..hooks import wire
from .client import CliError, config_from


def run(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CliError("no command given: ringfence run [--user U] [--login L] -- CMD [ARGS...]")
    path = args.socket or os.path.join(config_from(args).data_dir, wire.SOCKET_NAME)
    request = {"kind": "local", "user": args.user or "", "login": args.login or "", "command": command,
               "env": dict(os.environ)}
    try:
        sock, lines, _reply = wire.open_session(path, request, (0, 1, 2))
    except wire.HookError as exc:
        raise CliError(str(exc)) from None
    # The session's relay runs the command with our stdin, stdout and stderr; a resize
    # of our terminal reaches us, so pass it on (the relay reads the size itself).
    signal.signal(signal.SIGWINCH, lambda *_: _poke(sock))
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)  # keys reach the command through the terminal
    code = wire.wait_exit(lines)
    sock.close()
    return code


def _poke(sock) -> None:
    try:
        sock.send(b'{"winch":true}\n')
    except OSError:
        pass


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a command as a restricted session on this host",
        description="Ask the local enforcer to open a session (its own cgroup, with network "
        "restrictions, locks, limits and audit) and run CMD in it; the enforcer's relay runs it with "
        "this terminal or these pipes and records it. Root may name any --user and --login (CMD then "
        "runs as that login); other accounts only open sessions for themselves.",
    )
    p.add_argument("--user", help="Ringfence user the session belongs to (default: the login)")
    p.add_argument("--login", help="OS login of the session (default: the calling account)")
    p.add_argument("--socket", help="enforcer socket (default: <data_dir>/enforcer.sock)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run)
