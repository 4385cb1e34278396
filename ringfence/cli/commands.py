"""Every subcommand registers itself here; main.py builds the parser from this list."""

from __future__ import annotations

from . import (
    bootstrap,
    doctor,
    events,
    importer,
    locks,
    resources,
    run,
    session_control,
    sessions,
    ssh_hooks,
    status,
    up,
    users,
    web,
)

_ = session_control  # registers `sessions join` and `sessions kill` with the sessions group

REGISTRY = [
    up.register,
    bootstrap.register,  # bootstrap (the first admin, for stacks not started by up)
    status.register,
    resources.register,  # create, get, rm
    importer.register,  # import (the original's tctl get all)
    run.register,  # run
    events.register,  # events search|tail
    sessions.register,  # sessions ls (join, kill: see sessions.py), play
    locks.register,  # lock, unlock
    ssh_hooks.register,  # hooks: the sshd and PAM lines (OpenSSH integration)
    users.register,  # users add|update|ls|rm
    doctor.register,  # doctor (sshd and PAM settings that open a hole)
    web.register,  # web (the console), web login
]
