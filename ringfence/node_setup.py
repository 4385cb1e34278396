"""What `ringfence node install` changes on a host, decided without I/O: the PAM line's place,
its removal, and whether the system is one we know how to set up.

The PAM line goes right after `@include common-session` (pam_systemd, in common-session,
moves sshd into a cgroup of its own first; ours must come after it) and before any pam_env
line with user_readenv (a user's ~/.pam_environment must not reach our hook's environment).
"""

from __future__ import annotations

import re
from pathlib import Path

# The OpenSSH hooks (ringfence/hooks/): run by the base interpreter, isolated (-I -S), from the
# installed package (root-owned); `ringfence hooks` prints these lines, `doctor` checks them.
HOOKS_DIR = Path(__file__).resolve().parent / "hooks"
PAM_HOOK = "pam_hook.py"
PAM_ANCHOR = "@include common-session"
SUPPORTED = ("debian", "ubuntu")


def hook_command(python: str, name: str, data_dir: str, hooks_dir: Path = HOOKS_DIR) -> str:
    return f"{python} -I -S {hooks_dir / name} --data-dir {data_dir}"


def pam_line(python: str, data_dir: str) -> str:
    """`requisite`: a refusal stops the stack, so sshd runs nothing and shows the reason."""
    return f"session requisite pam_exec.so quiet stdout {hook_command(python, PAM_HOOK, data_dir)}"


def force_command(python: str, data_dir: str) -> str:
    return f"ForceCommand {hook_command(python, 'ssh_session.py', data_dir)}"


def drop_in(example: str, python: str, data_dir: str) -> str:
    """The example sshd drop-in with this installation's ForceCommand."""
    return re.sub(r"^ForceCommand .*$", force_command(python, data_dir), example, flags=re.M)


def elsewhere(python: str, data_dir: str) -> str:
    return ("on other systems set it up by hand: the sshd drop-in from examples/sshd_config.d/ into the "
            f"directory sshd_config Includes, with `{force_command(python, data_dir)}`, the line\n  "
            f"{pam_line(python, data_dir)}\nin sshd's PAM stack after the module that moves sessions into their "
            "own cgroup (pam_systemd) and before any pam_env with user_readenv, and a service running "
            "`python -m services.enforcer --config <data_dir>/node.yaml` as root")


class SetupError(Exception):
    """The host cannot be set up as asked; nothing was changed. The message says why and what to do."""


def os_family(os_release: str, python: str = "/usr/bin/python3", data_dir: str = "/var/lib/ringfence") -> str:
    """"debian" or "ubuntu" from /etc/os-release (ID, else ID_LIKE); SetupError otherwise."""
    fields = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', os_release, re.M))
    for candidate in (fields.get("ID", ""), *fields.get("ID_LIKE", "").split()):
        if candidate in SUPPORTED:
            return candidate
    name = fields.get("PRETTY_NAME") or "unknown"
    raise SetupError(f"`ringfence node install` knows Debian and Ubuntu; this is {name}; {elsewhere(python, data_dir)}")


def _is_user_readenv_env(line: str) -> bool:
    words = line.split("#", 1)[0].split()
    return any(w.endswith("pam_env.so") for w in words) and any(w.startswith("user_readenv=1") for w in words)


def _ours(line: str) -> bool:
    words = line.split("#", 1)[0].split()
    return "pam_exec.so" in words and any(w.endswith(f"/hooks/{PAM_HOOK}") for w in words)


def _anchor(lines: list[str]) -> int | None:
    return next((i for i, existing in enumerate(lines) if existing.split("#", 1)[0].split() == PAM_ANCHOR.split()),
                None)


def add_pam_line(text: str, line: str, path: str = "/etc/pam.d/sshd") -> str:
    """`text` with `line` right after `@include common-session`; unchanged when it is there already."""
    lines = text.splitlines(keepends=True)
    if any(existing.strip() == line for existing in lines):
        return text
    anchor = _anchor(lines)
    if anchor is None:
        raise SetupError(f"{path} has no `{PAM_ANCHOR}` line to put the Ringfence line after; add it by hand "
                         f"right after the module that moves sessions into their own cgroup: {line}")
    early = [i for i, existing in enumerate(lines[:anchor]) if _is_user_readenv_env(existing)]
    if early:
        raise SetupError(f"{path} line {early[0] + 1} reads the user's ~/.pam_environment (pam_env user_readenv=1) "
                         f"before `{PAM_ANCHOR}`; the Ringfence hook must run before it: move that line below "
                         f"`{PAM_ANCHOR}` or add the hook by hand")
    kept = [existing for existing in lines if not _ours(existing)]  # an older form of ours goes
    anchor = _anchor(kept)
    assert anchor is not None
    newline = "" if kept[anchor].endswith("\n") else "\n"
    return "".join([*kept[: anchor + 1], newline, line + "\n", *kept[anchor + 1 :]])


def remove_pam_line(text: str) -> str:
    """`text` without any Ringfence hook line."""
    return "".join(line for line in text.splitlines(keepends=True) if not _ours(line))


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
