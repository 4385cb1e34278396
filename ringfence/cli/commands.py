"""Every subcommand registers itself here; main.py builds the parser from this list."""

from __future__ import annotations

from . import status, up

REGISTRY = [
    up.register,
    status.register,
]
