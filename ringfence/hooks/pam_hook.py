"""sshd's PAM hook: `pam_exec.so quiet stdout <python3> -I -S <this file> [--data-dir D]`.

Runs as root in sshd's PAM session stack, right after pam_systemd (which moves
sshd into a cgroup of its own; ours must come later to win) and before any
pam_env (examples/pam.d/sshd.lines; `ringfence doctor` checks). The enforcer
decides (locks, identity, max_connections) and places the connection's sshd
process in its cgroup. On a refusal the stack stops (`requisite`): sshd runs
no shell or command, shows the client what we print, and the enforcer closes
a connection that has no channel to show it on (ssh -N).

Only root-owned facts are used: PAM_USER and SSH_AUTH_INFO_0 as sshd set
them, read before pam_env can add anything of the user's (sshd exposes the
key only in the session phase). The enforcer identifies sshd itself, as this
process's parent (SO_PEERCRED).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ringfence.hooks import wire


def main(argv: list[str]) -> int:
    if os.environ.get("PAM_TYPE") != "open_session":
        return 0  # close_session: the enforcer sees the connection's processes go
    request = {"kind": "connection", "login": os.environ.get("PAM_USER", ""),
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
