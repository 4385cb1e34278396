"""sshd's PAM hook: `pam_exec.so quiet stdout <python3> -I -S <this file> [--socket PATH]`.

Runs as root in sshd's PAM stack, in two places (examples/pam.d/sshd.lines):
  account       after authentication: the enforcer decides (locks, identity,
                max_connections) and places the connection's sshd process in its
                cgroup. A refusal fails the login before any session starts:
                sshd sends what we print as a banner and closes the connection,
                so `ssh -N` sees the reason too.
  open_session  after pam_systemd (which moves sshd into a cgroup of its own):
                the enforcer puts sshd back into the connection's cgroup.
Only root-owned facts are used: the PAM items and SSH_AUTH_INFO_0 that sshd
sets, read before pam_env can add anything of the user's (the PAM line sits
before any pam_env with user_readenv; `ringfence doctor` checks). The enforcer
identifies sshd itself, as this process's parent (SO_PEERCRED).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ringfence.hooks import wire

PHASES = {"account": "account", "open_session": "session"}


def main(argv: list[str]) -> int:
    phase = PHASES.get(os.environ.get("PAM_TYPE", ""))
    if phase is None:
        return 0  # close_session and the rest: the enforcer sees the connection's processes go
    request = {"kind": "connection", "phase": phase, "login": os.environ.get("PAM_USER", ""),
               "auth_info": os.environ.get("SSH_AUTH_INFO_0", "")}
    try:
        sock, _lines, _reply = wire.open_session(wire.socket_path(argv), request, timeout=15)
        sock.close()
    except wire.HookError as exc:
        print(f"ringfence: {exc}")  # pam_exec's `stdout` hands it to sshd for the user
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
