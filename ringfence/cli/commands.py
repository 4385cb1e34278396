"""Every subcommand, and the module that registers it; main.py builds the parser from this.

Only the module of the command being run is imported (an operator's `ringfence status`
does not pay for importing all the others); `ringfence -h` and a command that is not here
import them all. A module's `register(sub, common)` adds its parsers; list each command it
adds here, in the order `ringfence -h` shows them (tests/test_cli_options.py checks).
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS: dict[str, tuple[str, ...]] = {
    "up": ("up",),
    "bootstrap": ("bootstrap",),  # the first admin, for stacks not started by up
    "status": ("status",),
    "create": ("resources",),
    "get": ("resources",),
    "rm": ("resources",),
    "import": ("importer",),  # the original's tctl get all
    "run": ("run",),
    "events": ("events",),  # events search|tail|verify
    "sessions": ("sessions", "session_control"),  # ls and play; join and kill (session_control.py)
    "play": ("sessions",),  # = sessions play
    "lock": ("locks",),
    "unlock": ("locks",),
    "hooks": ("ssh_hooks",),  # the sshd and PAM lines (OpenSSH integration)
    "users": ("users",),  # users add|update|ls|rm
    "doctor": ("doctor",),  # sshd and PAM settings that open a hole
    "web": ("web",),  # the console; web login
    "tokens": ("fleet",),  # tokens add|ls|rm
    "nodes": ("fleet",),  # nodes ls|rm
    "node": ("node_host",),  # node join|install|uninstall
    "nats-setup": ("nats_setup",),  # compose
}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, command: str | None) -> None:
    """Register `command` (its module's commands), or every command when it is None or unknown."""
    wanted = COMMANDS.get(command or "")
    modules = wanted or tuple(dict.fromkeys(m for ms in COMMANDS.values() for m in ms))
    loaded = [importlib.import_module(f"{__package__}.{name}") for name in modules]
    for module in loaded:
        if hasattr(module, "register"):  # session_control adds itself to `sessions` on import
            module.register(sub, common)
