"""Search over the index as the service runs it (services/audit/index.py, core.search_sql):
paging with start_key never skips or repeats, over random data and random queries; and
the index costs less disk than the log it points into."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence.contract.api import SearchRequest
from ringfence.contract.events import Exec, SessionCommand, SessionNetwork, encode_event
from services.audit import core
from services.audit.index import INDEX_FILE, SearchIndex
from services.audit.logfiles import daily_path, disk_use
from services.audit.writer import AuditWriter, Incoming

BASE = dt.datetime(2024, 5, 1, 23, 59, 59, 990000, tzinfo=dt.UTC)  # times straddle midnight
TYPES = {"session.network": SessionNetwork, "session.command": SessionCommand, "exec": Exec}
USERS = ["alice", "bob", "carol"]
SIDS = ["s1", "s2", ""]


def iso(when: dt.datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@st.composite
def logs(draw):
    """Events in stream order: (type, user, sid, time offset in ms, stored offset in ms); many share a time."""
    n = draw(st.integers(1, 60))
    stored = sorted(draw(st.lists(st.integers(0, 40), min_size=n, max_size=n)))
    return [(draw(st.sampled_from(sorted(TYPES))), draw(st.sampled_from(USERS)), draw(st.sampled_from(SIDS)),
             draw(st.integers(0, 25)), s) for s in stored]


@st.composite
def queries(draw):
    return {
        "event_types": draw(st.lists(st.sampled_from(sorted(TYPES)), max_size=2, unique=True)),
        "user": draw(st.sampled_from(["", *USERS, "nobody"])),
        "sid": draw(st.sampled_from(["", *SIDS[:2], "unknown"])),
        "order": draw(st.sampled_from(["asc", "desc"])),
        "window": draw(st.one_of(st.none(), st.tuples(st.integers(0, 25), st.integers(1, 10)).map(
            lambda w: (w[0], w[0] + w[1])))),
    }


def write(directory: Path, log) -> list[dict]:
    """Write `log` through the real writer; the events as written, in write order."""
    writer = AuditWriter(directory, clock=lambda: BASE)
    writer.start()
    batch = []
    for i, (kind, user, sid, t, stored) in enumerate(log):
        event = TYPES[kind](uid=f"u{i}", user=user, sid=sid, time=iso(BASE + dt.timedelta(milliseconds=t)))
        batch.append(Incoming(encode_event(event), "", i + 1, int(BASE.timestamp() * 1000) + stored))
    for i in range(0, len(batch), 7):  # several batches, as the consumer hands them on
        writer.write_batch(batch[i : i + 7])
    writer.close()
    return [{"uid": f"u{i}", "type": kind, "user": user, "sid": sid, "t": t}
            for i, (kind, user, sid, t, _stored) in enumerate(log)]


def expected(written: list[dict], q: dict) -> list[str]:
    found = [(e["t"], i, e["uid"]) for i, e in enumerate(written)
             if (not q["event_types"] or e["type"] in q["event_types"]) and (not q["user"] or e["user"] == q["user"])
             and (not q["sid"] or e["sid"] == q["sid"])
             and (q["window"] is None or q["window"][0] <= e["t"] < q["window"][1])]
    found.sort(reverse=q["order"] == "desc")  # by time, then write order
    return [uid for _t, _i, uid in found]


def pages(index: SearchIndex, q: dict, size: int, max_bytes: int) -> list[str]:
    window = {}
    if q["window"] is not None:
        window = {"start": iso(BASE + dt.timedelta(milliseconds=q["window"][0])),
                  "end": iso(BASE + dt.timedelta(milliseconds=q["window"][1]))}
    request = SearchRequest(event_types=q["event_types"], user=q["user"], sid=q["sid"], order=q["order"],
                            limit=size, **window)
    seen: list[str] = []
    for _ in range(200):
        query = core.validate_search(request)
        lines, next_key = core.take_page(index.search(query), query.limit, max_bytes)
        seen += [msgspec.json.decode(line)["uid"] for line in lines]
        if not next_key:
            return seen
        request.start_key = next_key
    raise AssertionError("paging did not end")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.lists(queries(), min_size=1, max_size=4), st.integers(1, 5), st.sampled_from([1, 600, 10_000]))
def test_paging_never_skips_or_repeats(log, qs, size, max_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "log"
        written = write(directory, log)
        index = SearchIndex(directory / INDEX_FILE, lambda day: daily_path(directory, day))
        try:
            for q in qs:
                assert pages(index, q, size, max_bytes) == expected(written, q), q
        finally:
            index.close()


def test_the_index_costs_less_disk_than_the_log(tmp_path):
    directory = tmp_path / "log"
    writer = AuditWriter(directory)
    writer.start()
    for first in range(0, 20_000, 2000):
        writer.write_batch([
            Incoming(encode_event(SessionNetwork(user=f"user{i % 50}@example.com", sid=f"session-{i // 100}",
                                                 login="ubuntu", program="curl", dst_addr="10.1.2.3", dst_port=443,
                                                 server_hostname="node-1", cluster_name="main")))
            for i in range(first, first + 2000)])
    writer.close()
    use = disk_use(directory, None)
    assert use.index < use.log, (use.index, use.log)
