"""Kernel records to spooled events: attribution after a session ended, folding above capacity."""

from __future__ import annotations

import json
import os
import socket

from ringfence.contract.api import SessionInfo
from services.enforcer.attribution import Attribution
from services.enforcer.kernel_events import KernelEvents
from services.enforcer.netevents import SUBJECT_OUTSIDE, NetRecord
from services.enforcer.recording_events import DiskRecord
from services.enforcer.spool import Spool

ALICE = SessionInfo(sid="sid-alice", user="alice@example.com", login="alice", server_id="node-1",
                    server_hostname="web-1", started="", cluster_name="main", cgroup_id=7)


def session(cgroup_id: int) -> SessionInfo:
    return SessionInfo(sid=f"s{cgroup_id}", user="u", login="u", server_id="", server_hostname="", started="",
                       cgroup_id=cgroup_id)


def record(i: int, cgroup_id: int = 7, **kw) -> NetRecord:
    return NetRecord(boot_ns=i, wall_time=1_700_000_000 + i / 1000, cgroup_id=cgroup_id, pid=100, family=socket.AF_INET,
                     dst_port=1000 + i % 3, operation=1, action=1, src_addr=bytes(16),
                     dst_addr=bytes([127, 1, 0, i % 5]) + bytes(12), comm="flood", **kw)


def lines(spool: Spool) -> list[dict]:
    return [json.loads(line) for line in spool.path.read_bytes().splitlines()]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_records_read_after_their_session_ended_keep_its_attribution_for_a_while():
    live: dict[int, SessionInfo] = {7: ALICE}
    clock = Clock()
    attribution = Attribution(live.get, ttl=60, max_ended=2, clock=clock)
    assert attribution.session(7) is ALICE
    del live[7]
    attribution.ended(ALICE)
    clock.now = 59
    assert attribution.session(7) is ALICE  # ended, still attributed
    clock.now = 61
    attribution.ended(session(8))  # anything older than the ttl goes
    assert attribution.session(7) is None
    for cgid in (9, 10):
        attribution.ended(session(cgid))
    assert attribution.session(8) is None and attribution.session(10) is not None  # at most max_ended kept
    assert attribution.login(0) == "root" and attribution.login(2**31 - 7) == ""


def make(tmp_path, fold_above: int, fold_below: int) -> tuple[KernelEvents, Spool, dict]:
    spool = Spool(tmp_path / "spool")
    counters: dict = {}
    events = KernelEvents(spool, lambda ev: ev, Attribution({7: ALICE}.get), counters, lambda: 0,
                          fold_above=fold_above, fold_below=fold_below)
    return events, spool, counters


def test_every_record_is_a_line_or_counted_in_a_summary_that_names_the_session(tmp_path):
    events, spool, counters = make(tmp_path, fold_above=3000, fold_below=1000)
    for start in range(0, 400, 20):  # rounds of 20 records; nothing delivers the spool
        events.on_network([record(i) for i in range(start, start + 20)])
    events.flush_folds(7)
    written = lines(spool)
    one_by_one = [e for e in written if e["event"] == "session.network"]
    [summary] = [e for e in written if e["event"] == "audit.events_folded"]
    assert 0 < len(one_by_one) < 400
    assert len(one_by_one) + summary["count"] == 400 == counters["network_events"]
    assert summary["count"] == counters["folded_events"]
    assert (summary["sid"], summary["user"], summary["login"], summary["source"]) == (
        "sid-alice", "alice@example.com", "alice", "network")
    assert sorted(summary["targets"]) == sorted({f"127.1.0.{i % 5}:{1000 + i % 3}" for i in range(400)})
    assert summary["first_time"] <= summary["last_time"]
    assert all(e["sid"] == "sid-alice" and e["user"] == "alice@example.com" for e in one_by_one)


def test_summaries_come_before_the_events_that_follow_once_the_trail_caught_up(tmp_path):
    events, spool, _ = make(tmp_path, fold_above=1000, fold_below=500)
    events.on_network([record(i) for i in range(20)])  # written: the spool was empty
    events.on_network([record(i) for i in range(20, 40)])  # folded: over 1000 bytes wait
    spool.cursor = spool.path.stat().st_size  # the trail took everything
    events.on_network([record(i) for i in range(40, 45)])
    kinds = [e["event"] for e in lines(spool)]
    assert kinds == ["session.network"] * 20 + ["audit.events_folded"] + ["session.network"] * 5
    spool.close()


def test_outside_session_records_are_attributed_to_the_login_and_folded_per_login(tmp_path):
    events, spool, counters = make(tmp_path, fold_above=10**9, fold_below=0)
    events.on_network([record(1, cgroup_id=12345, uid=0, subject=SUBJECT_OUTSIDE)])
    [event] = lines(spool)
    assert (event["login"], event["reason"], event["sid"], event["user"]) == ("root", "outside_session", "", "")
    assert counters["outside_session_events"] == 1 and counters["unattributed_events"] == 0
    os.truncate(spool.path, 0)


def test_opens_folded_in_the_kernel_count_as_many_opens_written_or_summarised(tmp_path):
    def disk(i: int, repeats: int = 0) -> DiskRecord:
        first = i - 4 if repeats else 0
        return DiskRecord(boot_ns=i, wall_time=1_700_000_000 + i, cgroup_id=7, pid=100 + i, comm="cat",
                          path="/etc/hostname", flags=0, return_code=3, repeats=repeats, first_boot_ns=first,
                          first_wall_time=1_700_000_000 + first if repeats else 0.0)

    events, spool, counters = make(tmp_path, fold_above=10**9, fold_below=0)
    events.on_disks([disk(1), disk(2, repeats=499)])
    first, repeats = lines(spool)
    assert "count" not in first and (repeats["count"], repeats["pid"], repeats["sid"]) == (499, 102, "sid-alice")
    assert counters["disk_events"] == 500

    # Above capacity, a fold of repeats adds its count to the session's summary.
    events, spool, counters = make(tmp_path / "flood", fold_above=-1, fold_below=-1)
    events.on_disks([disk(1), disk(5, repeats=99)])
    events.flush_folds(7)
    [summary] = lines(spool)
    assert (summary["event"], summary["source"], summary["count"]) == ("audit.events_folded", "disk", 100)
    assert (summary["first_time"], summary["last_time"]) == ("2023-11-14T22:13:21.000Z", "2023-11-14T22:13:25.000Z")
    assert counters["disk_events"] == counters["folded_events"] == 100
