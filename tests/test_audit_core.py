"""Pure parts of the audit service and log format: naming, ei, hash chain, validation, paging."""

from __future__ import annotations

import dataclasses
import datetime as dt

import msgspec
import pytest

from ringfence.contract.api import ApiError, SearchRequest
from ringfence.contract.auditlog import (
    GENESIS_HASH,
    anchor_line,
    chain_hash,
    daily_file_name,
    event_lines,
    is_daily_file,
    parse_anchor,
    seal,
    unseal,
    verify_files,
)
from ringfence.contract.events import SessionNetwork, encode_event
from ringfence.contract.streams import MAX_EVENT_BYTES
from ringfence.runtime.pull_consumer import missing_sequences
from services.audit import core

UTC = dt.UTC


@pytest.mark.parametrize(
    ("when", "name"),
    [
        (dt.datetime(2021, 7, 22, 22, 24, 14, tzinfo=UTC), "2021-07-22.00:00:00.log"),
        (dt.datetime(2021, 7, 22, 0, 0, 0, tzinfo=UTC), "2021-07-22.00:00:00.log"),
        (dt.datetime(2021, 7, 22, 23, 59, 59, 999999, tzinfo=UTC), "2021-07-22.00:00:00.log"),
        # 01:30 in UTC+2 is still the previous UTC day
        (dt.datetime(2021, 7, 23, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))), "2021-07-22.00:00:00.log"),
    ],
)
def test_daily_file_name_is_the_utc_day(when, name):
    assert daily_file_name(when) == name
    assert is_daily_file(name)


@pytest.mark.parametrize("name", ["events.log", "rejected.log", "2021-07-22.log", "2021-07-22.00:00:00.log.tmp"])
def test_other_files_are_not_daily_files(name):
    assert not is_daily_file(name)


def test_seal_appends_a_hash_that_unseal_recovers():
    body = encode_event(SessionNetwork(uid="u1", sid="s"))
    line, digest = seal(GENESIS_HASH, body)
    assert line.endswith(b',"hash":"' + digest.encode() + b'"}')
    assert msgspec.json.decode(line)["hash"] == digest
    assert unseal(line) == (body, digest)
    assert digest == chain_hash(GENESIS_HASH, body)


def test_unseal_refuses_a_line_without_hash():
    with pytest.raises(ValueError, match="hash"):
        unseal(b'{"event":"exec"}')


def _write_chain(path, bodies, prev=GENESIS_HASH, first=None):
    lines = [first + b"\n"] if first else []
    for body in bodies:
        line, prev = seal(prev, body)
        lines.append(line + b"\n")
    path.write_bytes(b"".join(lines))
    return prev


def test_chain_runs_across_files_and_a_modified_line_is_named(tmp_path):
    day1, day2 = tmp_path / "2021-07-22.00:00:00.log", tmp_path / "2021-07-23.00:00:00.log"
    last = _write_chain(day1, [b'{"n":1}', b'{"n":2}'])
    _write_chain(day2, [b'{"n":3}', b'{"n":4}', b'{"n":5}'], prev=last)
    ok = verify_files([day1, day2])
    assert (ok.verified, ok.broken) == (5, None)

    day2.write_bytes(day2.read_bytes().replace(b'{"n":4', b'{"n":9'))
    bad = verify_files([day1, day2])
    assert bad.verified == 3
    assert (bad.broken.path, bad.broken.line_no) == (day2, 2)


def test_a_removed_line_breaks_the_chain_at_the_next_line(tmp_path):
    f = tmp_path / "2021-07-22.00:00:00.log"
    _write_chain(f, [b'{"n":1}', b'{"n":2}', b'{"n":3}'])
    lines = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(lines[0] + lines[2])
    assert verify_files([f]).broken.line_no == 2


def test_a_day_out_of_order_breaks_the_chain(tmp_path):
    day1, day2 = tmp_path / "2021-07-22.00:00:00.log", tmp_path / "2021-07-23.00:00:00.log"
    last = _write_chain(day1, [b'{"n":1}'])
    _write_chain(day2, [b'{"n":2}'], prev=last)
    assert verify_files([day2, day1]).broken.line_no == 1


def test_an_incomplete_last_line_is_not_a_break(tmp_path):
    f = tmp_path / "2021-07-22.00:00:00.log"
    _write_chain(f, [b'{"n":1}'])
    with open(f, "ab") as out:
        out.write(b'{"n":2,"ha')
    result = verify_files([f])
    assert (result.verified, result.broken, result.incomplete_tail) == (1, None, f)


def _anchored(path, bodies, prev=GENESIS_HASH):
    """A daily file as the writer makes it: its anchor, then `bodies`."""
    anchor, prev = anchor_line(path.name, prev)
    return _write_chain(path, bodies, prev=prev, first=anchor)


def test_each_day_begins_with_an_anchor_so_removing_the_oldest_days_keeps_the_chain(tmp_path):
    days = [tmp_path / f"2021-07-2{d}.00:00:00.log" for d in (2, 3, 4)]
    prev = GENESIS_HASH
    for n, day in enumerate(days):
        prev = _anchored(day, [b'{"n":%d}' % n, b'{"n":%d}' % (n + 10)], prev)
    whole = verify_files(days)
    assert (whole.verified, whole.broken, whole.starts_at) == (6, None, None)  # anchors are not events
    retained = verify_files(days[1:])  # day 1 removed by retention
    assert (retained.verified, retained.broken, retained.starts_at.file) == (4, None, days[1].name)
    middle = verify_files([days[0], days[2]])  # a day in the middle removed
    assert (middle.broken.path, middle.broken.line_no) == (days[2], 1)
    assert "a day before this one was removed or changed" in middle.broken.reason


def test_an_anchor_names_its_file_and_the_line_before_it(tmp_path):
    day1, day2 = tmp_path / "2021-07-22.00:00:00.log", tmp_path / "2021-07-23.00:00:00.log"
    last = _anchored(day1, [b'{"n":1}'])
    _anchored(day2, [b'{"n":2}'], last)
    copy = tmp_path / "2021-07-24.00:00:00.log"
    copy.write_bytes(day2.read_bytes())
    assert "names file 2021-07-23.00:00:00.log" in verify_files([copy]).broken.reason
    forged = tmp_path / "2021-07-25.00:00:00.log"  # an anchor claiming another predecessor: its hash breaks
    line = day2.read_bytes().splitlines()[0].replace(last.encode(), b"f" * 64).replace(b"07-23", b"07-25")
    forged.write_bytes(line + b"\n")
    assert verify_files([forged]).broken.reason.startswith("hash does not match")
    anchor = parse_anchor(day2.read_bytes().splitlines()[0])
    assert (anchor.event, anchor.file, anchor.prev_hash) == ("audit.chain_anchor", day2.name, last)
    assert parse_anchor(b'{"event":"exec","uid":"x"}') is None
    assert event_lines(day2) == day2.read_bytes().splitlines()[1:]


GOOD = encode_event(SessionNetwork(uid="9d0c1c3c-0000-4000-8000-000000000001"))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "malformed"),
        (b'{"event":"session.teleport","uid":"x"}', "session.teleport"),
        (b'{"event":"session.network","uid":"x","dst_port":"eighty"}', "dst_port"),
        (b'{"event":"session.network"}', "no uid"),
        (b'{"event":"session.network","uid":""}', "no uid"),
        (b'{"event":"session.network","uid":"x"}', "no time"),
        (b"[1,2]", "valid audit event"),
        (b'{"event":"exec","uid":"x","time":"yesterday"}', 'time: "yesterday" is not an RFC 3339 time'),
        (b'{"event":"audit.chain_anchor","uid":"x"}', "audit.chain_anchor"),  # nobody publishes an anchor
        (GOOD[:-1] + b',"pad":"' + b"x" * MAX_EVENT_BYTES + b'"}', "limit"),
    ],
)
def test_decode_incoming_rejects_with_a_reason(data, reason):
    with pytest.raises(core.Rejected, match=reason):
        core.decode_incoming(data)


def test_decode_incoming_accepts_an_event_and_gives_its_time():
    event, time_ms = core.decode_incoming(GOOD)
    assert event.uid == "9d0c1c3c-0000-4000-8000-000000000001"
    assert time_ms == core.parse_time_ms(event.time)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2021-07-22T22:24:14.984Z", 1626992654984),
        ("2021-07-23T00:24:14.984+02:00", 1626992654984),
    ],
)
def test_parse_time_ms(text, ms):
    assert core.parse_time_ms(text) == ms


@pytest.mark.parametrize("text", ["yesterday", "2021-07-22", "2021-07-22T22:24:14", ""])
def test_parse_time_ms_refuses_times_without_offset(text):
    with pytest.raises(ValueError, match="RFC 3339"):
        core.parse_time_ms(text)


def test_validate_search_defaults():
    q = core.validate_search(SearchRequest())
    assert (q.start_ms, q.end_ms, q.limit, q.descending, q.after) == (None, None, 500, False, None)


def test_validate_search_converts_every_field():
    q = core.validate_search(
        SearchRequest(
            start="2021-07-22T00:00:00Z",
            end="2021-07-23T00:00:00Z",
            event_types=["session.network", "exec", "exec"],
            user="demo",
            sid="s1",
            limit=10_000,
            order="desc",
            start_key="1626992654984.17",
        )
    )
    assert q.event_types == ("session.network", "exec")
    assert q.end_ms - q.start_ms == 86_400_000
    assert (q.limit, q.descending, q.after) == (10_000, True, (1626992654984, 17))


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (SearchRequest(start="yesterday"), 'start: "yesterday" is not an RFC 3339 time'),
        (SearchRequest(end="2021-07-22"), 'end: "2021-07-22" is not an RFC 3339 time'),
        (SearchRequest(start="2021-07-22T00:00:00Z", end="2021-07-22T00:00:00Z"), "is not after start"),
        (SearchRequest(limit=0), "limit: 0 is out of range"),
        (SearchRequest(limit=10_001), "limit: 10001 is out of range"),
        (SearchRequest(event_types=["exec", "nope"]), 'event_types[1]: "nope" is not an event type'),
        (SearchRequest(start_key="abc"), 'start_key: "abc"'),
    ],
)
def test_validate_search_names_the_bad_value(req, message):
    with pytest.raises(ApiError) as info:
        core.validate_search(req)
    assert message in str(info.value)
    assert info.value.kind == "invalid"


ROWS = [(1000 + i, i, b"x" * 10) for i in range(5)]


def test_take_page_sets_next_key_when_more_rows_remain():
    assert core.take_page(ROWS[:3], limit=3, max_bytes=10_000) == ([b"x" * 10] * 3, "")
    lines, key = core.take_page(ROWS[:4], limit=3, max_bytes=10_000)
    assert (len(lines), key) == (3, "1002.2")


def test_take_page_stops_before_the_size_limit_but_returns_at_least_one():
    lines, key = core.take_page(ROWS, limit=5, max_bytes=25)
    assert (len(lines), key) == (2, "1001.1")
    lines, key = core.take_page(ROWS, limit=5, max_bytes=1)
    assert (len(lines), key) == (1, "1000.0")


def test_rejected_line_keeps_reason_and_data():
    line = core.rejected_line("bad", "ringfence.audit.x", 7, b"\xffgarbage", dt.datetime(2021, 7, 22, tzinfo=UTC))
    record = msgspec.json.decode(line)
    assert record["reason"] == "bad" and record["stream_seq"] == 7 and record["data"].endswith("garbage")
    assert record["time"] == "2021-07-22T00:00:00.000Z" and line.endswith(b"\n")


@pytest.mark.parametrize(
    ("expected", "received", "missing"),
    [
        (None, [5, 6], []),  # first start: nothing known
        (5, [5, 6, 7], []),  # in order
        (5, [8, 9], [5, 6, 7]),  # 5-7 were handed to a fetch that never arrived
        (5, [5, 7, 9], [6, 8]),
        (5, [3, 4], []),  # redeliveries of what is written
        (5, [3, 8], [5, 6, 7]),
        (5, [0, 6], [5]),  # 0: not a JetStream message
        (5, [5000], []),  # wider than max_gap: not filled
    ],
)
def test_missing_sequences_are_the_gaps_before_the_newest_received(expected, received, missing):
    assert missing_sequences(expected, received, max_gap=1000) == missing


Q = core.validate_search(SearchRequest())


@pytest.mark.parametrize(
    ("query", "ids", "index"),
    [
        (Q, core.SearchIds(), "events_by_time"),
        (dataclasses.replace(Q, user="u"), core.SearchIds(user=7), "events_by_user"),
        (dataclasses.replace(Q, sid="s"), core.SearchIds(sid=3), "events_by_sid"),
        (dataclasses.replace(Q, sid="s", user="u"), core.SearchIds(user=7, sid=3), "events_by_sid"),
        (dataclasses.replace(Q, event_types=("exec",)), core.SearchIds(types=(2,)), "events_by_type"),
        (dataclasses.replace(Q, user="u", event_types=("exec",)), core.SearchIds(user=7, types=(2,)),
         "events_by_user_type"),
    ],
)
def test_each_common_search_uses_the_index_made_for_it(query, ids, index):
    sql, params = core.search_sql(query, ids)
    assert f"INDEXED BY {index} " in sql and sql.count("INDEXED BY") == 1
    assert params["limit"] == query.limit + 1


def test_several_types_are_one_ordered_subquery_each():
    q = dataclasses.replace(Q, event_types=("exec", "session.network"), descending=True, after=(5, 9))
    sql, params = core.search_sql(q, core.SearchIds(types=(2, 4)))
    assert sql.count("INDEXED BY events_by_type") == 2 and "UNION ALL" in sql
    assert sql.endswith("ORDER BY time_ms DESC, loc DESC LIMIT :limit")
    assert (params["after_time"], params["after_loc"]) == (5, 9) and "loc < :after_loc" in sql


@pytest.mark.parametrize(
    ("now", "retention", "cutoff"),
    [
        (dt.datetime(2021, 7, 22, 12, tzinfo=UTC), 0, None),  # not set: keep everything
        (dt.datetime(2021, 7, 22, 12, tzinfo=UTC), 86400, dt.date(2021, 7, 21)),
        (dt.datetime(2021, 7, 22, 0, 0, tzinfo=UTC), 90 * 86400, dt.date(2021, 4, 23)),
        (dt.datetime(2021, 7, 22, 23, 59, tzinfo=UTC), 36 * 3600, dt.date(2021, 7, 21)),
    ],
)
def test_retention_keeps_every_day_younger_than_the_retention(now, retention, cutoff):
    assert core.retention_cutoff(now, retention) == cutoff
