"""Secret files (operator identities, NATS nkey seeds): created 0600, never overwritten."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a CLI command that signs nothing does not load nacl
    from .auth import Identity


def write_secret(path: Path, text: str) -> Path:
    """Create `path` with mode 0600 holding `text`; FileExistsError when it exists.

    Missing parent directories are created 0700. The file is written under a
    temporary name and linked into place, so `path` never exists half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails with FileExistsError instead of replacing
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_identity(path: Path, identity: Identity) -> Path:
    from .auth import format_identity

    return write_secret(path, format_identity(identity))


def read_identity(path: Path) -> Identity:
    """The identity in `path`; OSError when unreadable, auth.AuthError when it is not one."""
    from .auth import parse_identity

    return parse_identity(Path(path).read_text(), str(path))


def readable(path: Path) -> bool:
    return os.access(path, os.R_OK) and Path(path).is_file()


__all__ = ["read_identity", "readable", "write_identity", "write_secret"]
