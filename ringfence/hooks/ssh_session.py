"""sshd's ForceCommand: `<python3> -I -S <this file> [--socket PATH]`.

Runs as the user, in the connection's cgroup. It only hands its stdin, stdout
and stderr to the enforcer (SCM_RIGHTS) with what the client asked to run, and
waits for the exit status: a root relay owns the terminal or pipes, runs the
shell, command or sftp-server as the login in the session's cgroup, records it
and enforces its limits. Nothing here is trusted: the enforcer takes the
user, the addresses and the connection from root-owned facts.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ringfence.hooks import wire

DROP = ("SSH_ORIGINAL_COMMAND", "RINGFENCE_SESSION_ID", "RINGFENCE_USER")


def _stdio() -> list[int]:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(fds[-1] if fds else os.open(os.devnull, os.O_RDWR))
    return fds


def main(argv: list[str]) -> int:
    # The relay takes the terminal over (and hangs up every other holder of it):
    # that must not end this process before the exit status arrives.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    original = os.environ.get("SSH_ORIGINAL_COMMAND")
    request = {
        "kind": "channel",
        "command": [] if original is None else [original],
        "env": {k: v for k, v in os.environ.items() if k not in DROP},
    }
    try:
        sock, lines, _reply = wire.open_session(wire.socket_path(argv), request, _stdio())
    except wire.HookError as exc:
        sys.stderr.write(f"ringfence: {exc}\n")
        return 1
    for fd in (0, 1):  # the relay has them now
        os.close(fd)
    code = wire.wait_exit(lines)
    sock.close()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
