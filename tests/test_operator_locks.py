"""Locks and locking modes on control requests (runtime/operator_auth.py), table-driven without NATS."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from ringfence import locking
from ringfence.contract import names
from ringfence.contract import resources as r
from ringfence.runtime.operator_auth import OperatorDirectory

NOW = dt.datetime(2021, 8, 14, 12, 0, tzinfo=dt.UTC)
ALICE = r.User(metadata=r.Metadata(name="alice"), spec=r.UserSpec(roles=["locksmith"]))
STRICT_ROLE = r.Role(metadata=r.Metadata(name="locksmith"), spec=r.RoleSpec(options=r.RoleOptions(lock="strict")))
PLAIN_ROLE = r.Role(metadata=r.Metadata(name="locksmith"))


def directory(locks: list[r.Lock], *, stale: bool, cluster_mode: str = "best_effort") -> OperatorDirectory:
    d = OperatorDirectory(None, max_staleness=30)  # type: ignore[arg-type] - never connects here
    d.locks.values = {lock.metadata.name: lock for lock in locks}
    d.locks.synced_at = time.monotonic() - (31 if stale else 0)
    d.started = time.monotonic() - 60
    d.cap.values = {names.CAP_KEY: r.ClusterAuthPreference(spec=r.ClusterAuthPreferenceSpec(locking_mode=cluster_mode))}
    return d


def lock(expires: str = "", **target: str) -> r.Lock:
    return r.Lock(metadata=r.Metadata(name="l"),
                  spec=r.LockSpec(target=r.LockTarget(**target), message="m", expires=expires))


@pytest.mark.parametrize("locks, stale, cluster_mode, role, refusal", [
    ([], False, "best_effort", PLAIN_ROLE, None),
    ([lock(user="alice")], False, "best_effort", PLAIN_ROLE, 'lock targeting User:"alice" is in force: m'),
    ([lock(role="locksmith")], False, "best_effort", PLAIN_ROLE, 'lock targeting Role:"locksmith" is in force: m'),
    ([lock(user="alice", expires="2021-08-14T11:00:00Z")], False, "best_effort", PLAIN_ROLE, None),  # expired
    ([lock(user="bob"), lock(login="alice")], False, "best_effort", PLAIN_ROLE, None),  # not her, not a login
    ([], True, "best_effort", PLAIN_ROLE, None),  # best_effort: the last locks known
    ([lock(user="alice")], True, "best_effort", PLAIN_ROLE, 'lock targeting User:"alice" is in force: m'),
    ([], True, "strict", PLAIN_ROLE, locking.PREVENTIVE_LOCKOUT),  # cluster-wide strict
    ([], True, "best_effort", STRICT_ROLE, locking.PREVENTIVE_LOCKOUT),  # one strict role suffices
    ([], False, "strict", STRICT_ROLE, None),  # strict, but the view is current
])
def test_lock_refusal_of_an_operator(locks, stale, cluster_mode, role, refusal):
    d = directory(locks, stale=stale, cluster_mode=cluster_mode)
    assert d.lock_refusal(ALICE, [role], NOW) == refusal
