"""What `ringfence node install` changes on a host, decided without I/O: the PAM line's place,
its removal, and whether the system is one we know how to set up.

The PAM line goes right after `@include common-session` (pam_systemd, in common-session,
moves sshd into a cgroup of its own first; ours must come after it) and before any pam_env
line with user_readenv (a user's ~/.pam_environment must not reach our hook's environment).
"""

from __future__ import annotations

import re

# The OpenSSH hook: one constant for its path and the arguments PAM and sshd give it.
HOOK_PATH = "/usr/local/lib/ringfence/ringfence-hook"
PAM_LINE = f"session required pam_exec.so quiet stdout {HOOK_PATH} pam"
PAM_ANCHOR = "@include common-session"
SUPPORTED = ("debian", "ubuntu")
ELSEWHERE = ("on other systems set it up by hand: the sshd drop-in from examples/sshd_config.d/ into the "
             "directory sshd_config Includes, the line\n  " + PAM_LINE + "\nin sshd's PAM stack after the module "
             "that moves sessions into their own cgroup (pam_systemd) and before any pam_env with user_readenv, "
             "the hook at " + HOOK_PATH + ", and a service running `python -m services.enforcer --config "
             "<data_dir>/node.yaml` as root")


class SetupError(Exception):
    """The host cannot be set up as asked; nothing was changed. The message says why and what to do."""


def os_family(os_release: str) -> str:
    """"debian" or "ubuntu" from /etc/os-release (ID, else ID_LIKE); SetupError otherwise."""
    fields = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', os_release, re.M))
    for candidate in (fields.get("ID", ""), *fields.get("ID_LIKE", "").split()):
        if candidate in SUPPORTED:
            return candidate
    name = fields.get("PRETTY_NAME") or "unknown"
    raise SetupError(f"`ringfence node install` knows Debian and Ubuntu; this is {name}; {ELSEWHERE}")


def _is_user_readenv_env(line: str) -> bool:
    words = line.split("#", 1)[0].split()
    return any(w.endswith("pam_env.so") for w in words) and any(w.startswith("user_readenv=1") for w in words)


def add_pam_line(text: str, path: str = "/etc/pam.d/sshd") -> str:
    """`text` with PAM_LINE right after `@include common-session`; unchanged when it is there already."""
    lines = text.splitlines(keepends=True)
    if any(line.strip() == PAM_LINE for line in lines):
        return text
    anchor = next((i for i, line in enumerate(lines) if line.split("#", 1)[0].split() == PAM_ANCHOR.split()), None)
    if anchor is None:
        raise SetupError(f"{path} has no `{PAM_ANCHOR}` line to put the Ringfence line after; add it by hand: "
                         f"{ELSEWHERE}")
    early = [i for i, line in enumerate(lines[:anchor]) if _is_user_readenv_env(line)]
    if early:
        raise SetupError(f"{path} line {early[0] + 1} reads the user's ~/.pam_environment (pam_env user_readenv=1) "
                         f"before `{PAM_ANCHOR}`; the Ringfence hook must run before it: move that line below "
                         f"`{PAM_ANCHOR}` or add the hook by hand")
    newline = "" if lines[anchor].endswith("\n") else "\n"
    return "".join([*lines[: anchor + 1], newline, PAM_LINE + "\n", *lines[anchor + 1 :]])


def remove_pam_line(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if line.strip() != PAM_LINE)


def hook_script(python: str) -> str:
    """The hook: the venv's Python, isolated (-I: no PYTHONPATH, no user site, no PYTHON* variables)."""
    return f"""#!/bin/sh
# Installed by `ringfence node install`: the OpenSSH hooks of Ringfence. Runs isolated from the
# environment of the user logging in; where the enforcer is comes from root-owned configuration.
case "$1" in
    pam) shift; exec {python} -I -m ringfence.cli.main pam-hook "$@" ;;
    session) shift; exec {python} -I -m ringfence.cli.main ssh-session "$@" ;;
    *) echo "usage: $0 pam|session" >&2; exit 2 ;;
esac
"""


def unit(description: str, exec_start: str) -> str:
    return f"""# Installed by `ringfence node install`; removed by `ringfence node uninstall`.
[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={exec_start}
Restart=always
RestartSec=2
# It attaches BPF programs and manages cgroups: it runs as root, unsandboxed.

[Install]
WantedBy=multi-user.target
"""
