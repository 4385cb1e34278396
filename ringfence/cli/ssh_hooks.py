"""The two OpenSSH hooks (see examples/sshd_config and README "OpenSSH"):

  ringfence pam-hook     sshd's PAM session stack (pam_exec, as root): places
                         the sshd process of the connection in a connection
                         session; refusing fails the login.
  ringfence ssh-session  sshd's ForceCommand (as the user): opens a channel
                         session inside the connection and runs the shell,
                         the command or sftp-server in it.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import sys

from ..contract.api import OpenSessionRequest
from .client import CliError, config_from
from .enforcer_link import EnforcerLink, socket_path
from .ptyproxy import run_plain, run_with_pty, window_size
from .sockaddr import connection_addresses

SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/ssh/sftp-server",
                "/usr/libexec/sftp-server")


def pam_hook(args: argparse.Namespace) -> int:
    if os.environ.get("PAM_TYPE") != "open_session":
        return 0  # close_session: the enforcer sees the connection's processes go
    login = os.environ.get("PAM_USER", "")
    sshd = os.getppid()
    remote, local = connection_addresses(sshd)
    req = OpenSessionRequest(
        kind="connection",
        login=login,
        pid=sshd,
        auth_info=os.environ.get("SSH_AUTH_INFO_0", ""),
        addr_remote=remote or os.environ.get("PAM_RHOST", ""),
        addr_local=local,
    )
    path = args.socket or socket_path(config_from(args).data_dir)
    try:
        link = EnforcerLink(path, timeout=10)
        link.open(req)
        link.close()
    except CliError as exc:
        # pam_exec shows this to the user with its `stdout` option; sshd logs the failure.
        print(f"ringfence: {exc}")
        return 1
    return 0


def _program(original: str | None) -> tuple[str, list[str], list[str]]:
    """(path to exec, argv, command for the audit log) for what the client asked."""
    shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    if original in ("internal-sftp", "sftp", "sftp-server") or (original or "").endswith("/sftp-server"):
        server = next((p for p in SFTP_SERVERS if os.path.exists(p)), None) or shutil.which("sftp-server")
        if not server:
            raise CliError("sftp is not available: no sftp-server binary on this host")
        return server, [server], ["sftp"]
    if original:
        return shell, [shell, "-c", original], [original]
    return shell, ["-" + os.path.basename(shell)], [shell]


def ssh_session(args: argparse.Namespace) -> int:
    original = os.environ.get("SSH_ORIGINAL_COMMAND")
    interactive = os.isatty(0)
    path, argv, command = _program(original)
    cols, rows = window_size(0) if interactive else (0, 0)
    req = OpenSessionRequest(
        kind="channel", command=command, interactive=interactive, term=os.environ.get("TERM", ""),
        width=cols, height=rows,
    )
    link = EnforcerLink(args.socket or socket_path(config_from(args).data_dir))
    try:
        reply = link.open(req)
    except CliError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    os.environ["RINGFENCE_SESSION_ID"] = reply.sid
    os.environ["RINGFENCE_USER"] = reply.user
    if interactive:
        return run_with_pty(path, argv, link, reply.record)
    return run_plain(path, argv, link)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pam-hook", parents=[common], help="sshd PAM session hook (pam_exec, root)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", help="enforcer socket (default: <data_dir>/enforcer.sock)")
    p.set_defaults(func=pam_hook)
    p = sub.add_parser("ssh-session", parents=[common], help="sshd ForceCommand wrapper (runs as the user)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", help="enforcer socket (default: <data_dir>/enforcer.sock)")
    p.set_defaults(func=ssh_session)
