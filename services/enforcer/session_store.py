"""Active sessions on this node, persisted so a restarted enforcer takes them back."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from ringfence.contract.api import SessionInfo


class SessionStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def save(self, info: SessionInfo) -> None:
        path = self.dir / f"{info.sid}.json"
        tmp = path.with_suffix(".tmp")
        # No fsync: the file must outlive the enforcer (the page cache does that), not the
        # machine (a crash ends every session anyway); this is on every login's path.
        tmp.write_bytes(msgspec.json.encode(info))
        os.replace(tmp, path)

    def delete(self, sid: str) -> None:
        (self.dir / f"{sid}.json").unlink(missing_ok=True)

    def load_all(self) -> list[SessionInfo]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(msgspec.json.decode(path.read_bytes(), type=SessionInfo))
            except (msgspec.DecodeError, OSError):
                path.rename(path.with_suffix(".corrupt"))
        return out
