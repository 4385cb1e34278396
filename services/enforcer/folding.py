"""Kernel records counted instead of written one by one, when they come faster
than the audit trail takes them (a flood): per session (or login outside
sessions) and source, how many, the first and last time, and the distinct
destinations or paths up to MAX_FOLDED_TARGETS. So who and how many are kept
when the detail cannot be. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ringfence.contract.api import SessionInfo
from ringfence.contract.events import MAX_FOLDED_TARGETS, EventsFolded

from .records import attribute, rfc3339, stable_uid

# (source, session cgroup id or 0, uid of a login outside sessions or 0)
FoldKey = tuple[str, int, int]


@dataclass
class _Fold:
    session: SessionInfo | None
    login: str
    first: float
    last: float
    count: int = 0
    targets: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    truncated: bool = False


class Folder:
    def __init__(self, max_targets: int = MAX_FOLDED_TARGETS) -> None:
        self.max_targets = max_targets
        self._folds: dict[FoldKey, _Fold] = {}

    def __len__(self) -> int:
        return len(self._folds)

    def add(self, key: FoldKey, session: SessionInfo | None, login: str, when: float, target: str,
            count: int = 1, first: float | None = None) -> None:
        """Count `count` events (from `first` to `when`, or just at `when`)."""
        first = when if first is None else first
        fold = self._folds.get(key)
        if fold is None:
            fold = self._folds[key] = _Fold(session, login, first, when)
        fold.count += count
        fold.first = min(fold.first, first)
        fold.last = max(fold.last, when)
        if target not in fold.targets:
            if len(fold.targets) < self.max_targets:
                fold.targets[target] = None
            else:
                fold.truncated = True

    def take(self, cgroup_id: int | None = None) -> list[EventsFolded]:
        """The summaries (all, or those of one session's cgroup), forgotten here."""
        keys = [k for k in self._folds if cgroup_id is None or k[1] == cgroup_id]
        return [self._event(k, self._folds.pop(k)) for k in keys]

    @staticmethod
    def _event(key: FoldKey, fold: _Fold) -> EventsFolded:
        source, cgroup_id, uid = key
        ev = EventsFolded(
            uid=stable_uid(f"folded:{source}:{cgroup_id}:{uid}:{fold.first}:{fold.count}"),
            time=rfc3339(fold.last), source=source, count=fold.count, first_time=rfc3339(fold.first),
            last_time=rfc3339(fold.last), targets=list(fold.targets), targets_truncated=fold.truncated,
        )
        ev.login = fold.login
        return attribute(ev, fold.session)
