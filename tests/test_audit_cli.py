"""`ringfence events search|tail|verify` as subprocesses against the real audit service."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import signal
import subprocess
import sys

import msgspec
import nats

from ringfence.contract import names
from ringfence.contract.api import ApiReply, SearchRequest, SearchResult
from ringfence.contract.auditlog import daily_files, event_lines
from ringfence.contract.events import Exec, LockCreated, SessionCommand, SessionNetwork, encode_event, now_rfc3339
from ringfence.runtime.audit_publish import publish_event
from services.audit.writer import AuditWriter, Incoming
from tests.support.nats import TEST_NODE
from tests.support.procs import ROOT, wait_for
from tests.test_audit_flow import counters


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ringfence.cli.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def search(url: str, *args: str) -> list[dict]:
    r = cli("events", "search", "--nats-url", url, "--format", "json", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


async def publish(url: str, events) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for e in events:
            e.server_id = e.server_id or TEST_NODE
            await publish_event(js, e)
    finally:
        await nc.close()


def stored_lines(data_dir) -> list[str]:
    return [x.decode() for f in daily_files(data_dir / "log") for x in event_lines(f)]


EVENTS = [
    SessionNetwork(uid="n1", time="2021-07-22T10:00:00.000Z", user="demo", sid="s-demo", program="curl",
                   dst_addr="10.1.2.3", dst_port=80),
    SessionCommand(uid="c1", time="2021-07-22T11:00:00.000Z", user="demo", sid="s-demo", program="curl",
                   argv=["curl", "http://10.1.2.3"]),
    SessionNetwork(uid="n2", time="2021-07-22T12:00:00.000Z", user="bob", sid="s-bob", program="nc",
                   dst_addr="fe80::1", dst_port=22, action=0),
    LockCreated(uid="l1", time="2021-07-23T09:00:00.000Z", user="admin", name="lock-1", target={"user": "bob"}),
    Exec(uid="e1", time="2021-07-24T00:00:00.000Z", user="bob", command="ls"),
]


def wait_written(url: str, n: int, timeout: float = 10) -> None:
    """Until the service counts `n` events written: in the log and in the index (lines reach the
    files a moment before the index commit that makes them searchable)."""
    wait_for(lambda: counters(url)["written"] >= n, timeout, what=f"{n} events written and indexed")


def start_with_events(nats_server, data_dir, services) -> str:
    services("audit")
    asyncio.run(publish(nats_server.url, EVENTS))
    wait_written(nats_server.url, len(EVENTS))
    return nats_server.url


def uids(found: list[dict]) -> list[str]:
    return [e["uid"] for e in found]


def test_search_filters_orders_and_prints_the_stored_lines(nats_server, data_dir, services):
    url = start_with_events(nats_server, data_dir, services)

    everything = cli("events", "search", "--nats-url", url, "--format", "json")
    assert everything.stdout.splitlines() == stored_lines(data_dir)  # exactly as written
    assert uids(search(url, "--type", "session.network")) == ["n1", "n2"]
    assert uids(search(url, "--type", "exec,lock.created", "--type", "session.command")) == ["c1", "l1", "e1"]
    assert uids(search(url, "--user", "bob")) == ["n2", "e1"]
    assert uids(search(url, "--sid", "s-demo")) == ["n1", "c1"]
    assert [e["ei"] for e in search(url, "--sid", "s-demo")] == [0, 1]
    # from inclusive, to exclusive
    assert uids(search(url, "--from", "2021-07-22T11:00:00Z", "--to", "2021-07-24T00:00:00Z")) == ["c1", "n2", "l1"]
    assert uids(search(url, "--order", "desc")) == ["e1", "l1", "n2", "c1", "n1"]
    assert uids(search(url, "--since", "1h")) == []  # the sample events are from 2021


def test_search_limit_text_format_and_errors(nats_server, data_dir, services):
    url = start_with_events(nats_server, data_dir, services)

    limited = cli("events", "search", "--nats-url", url, "--limit", "2", "--order", "desc")
    assert limited.returncode == 0
    lines = limited.stdout.splitlines()
    assert len(lines) == 2 and "more events match" in limited.stderr
    assert lines[0].startswith("2021-07-24T00:00:00.000Z  exec") and "command=ls" in lines[0]

    text = cli("events", "search", "--nats-url", url, "--type", "session.network").stdout.splitlines()
    assert "T4002I" in text[0] and "demo" in text[0] and text[0].endswith("curl 10.1.2.3:80 connect denied")
    assert text[1].endswith("nc [fe80::1]:22 connect observed")

    for args, message in [
        (("--limit", "0"), "ERROR: limit: 0 is out of range (1 to 10000)"),
        (("--limit", "10001"), "ERROR: limit: 10001 is out of range"),
        (("--from", "yesterday"), 'ERROR: --from: "yesterday" is not an RFC 3339 time'),
        (("--since", "an hour"), 'ERROR: --since: "an hour" is not a duration'),
        (("--type", "session.teleport"), 'ERROR: --type: "session.teleport" is not an event type'),
    ]:
        r = cli("events", "search", "--nats-url", url, *args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)


async def _first_page(url: str, req: SearchRequest) -> SearchResult:
    nc = await nats.connect(url)
    try:
        msg = await nc.request(names.api_subject(names.AUDIT_API, "search"), msgspec.json.encode(req), timeout=5)
    finally:
        await nc.close()
    return msgspec.json.decode(msgspec.json.decode(msg.data, type=ApiReply).result, type=SearchResult)


async def _pages(url: str, order: str, size: int) -> list[str]:
    nc = await nats.connect(url)
    found: list[str] = []
    try:
        req = SearchRequest(limit=size, order=order)
        while True:
            msg = await nc.request(names.api_subject(names.AUDIT_API, "search"), msgspec.json.encode(req), timeout=5)
            reply = msgspec.json.decode(msg.data, type=ApiReply)
            assert reply.ok, reply.error
            result = msgspec.json.decode(reply.result, type=SearchResult)
            found += [msgspec.json.decode(e)["uid"] for e in result.events]
            assert len(result.events) <= size
            if not result.next_key:
                return found
            req.start_key = result.next_key
    finally:
        await nc.close()


def test_paging_with_start_key_visits_every_event_once(nats_server, data_dir, services):
    url = start_with_events(nats_server, data_dir, services)
    assert asyncio.run(_pages(url, "asc", 2)) == ["n1", "c1", "n2", "l1", "e1"]
    assert asyncio.run(_pages(url, "desc", 3)) == ["e1", "l1", "n2", "c1", "n1"]


def test_the_cli_pages_with_start_key(nats_server, data_dir, services):
    url = start_with_events(nats_server, data_dir, services)
    seen: list[str] = []
    key: list[str] = []
    for _ in range(5):  # --limit 2, then --start-key from what it printed, until no more match
        page = cli("events", "search", "--nats-url", url, "--format", "json", "--limit", "2", "--order", "desc", *key)
        assert page.returncode == 0, page.stderr
        seen += [json.loads(line)["uid"] for line in page.stdout.splitlines()]
        found = re.findall(r"--start-key (\S+)\)", page.stderr)
        if not found:
            break
        key = ["--start-key", found[0]]
    assert seen == ["e1", "l1", "n2", "c1", "n1"]  # every event once, in order
    bad = cli("events", "search", "--nats-url", url, "--start-key", "yesterday")
    assert bad.returncode == 1
    assert 'ERROR: start_key: "yesterday" is not a key returned by a previous search' in bad.stderr


def test_a_result_bigger_than_a_nats_message_comes_in_pages(nats_server, data_dir, services):
    services("audit")
    # ~2 MB of events: more than one reply may carry (NATS max_payload is 1 MB).
    big = [SessionCommand(uid=f"big-{i:04d}", time=now_rfc3339(), argv=["x" * 1500]) for i in range(1300)]
    asyncio.run(publish(nats_server.url, big))
    wait_written(nats_server.url, len(big), 30)
    first = asyncio.run(_first_page(nats_server.url, SearchRequest(limit=1300)))
    assert 0 < len(first.events) < 1300 and first.next_key  # cut by size, not by limit
    found = search(nats_server.url, "--limit", "1300")  # the CLI follows next_key
    assert uids(found) == [e.uid for e in big]


def test_tail_prints_new_events_until_interrupted(nats_server, data_dir, services, tmp_path):
    services("audit")
    asyncio.run(publish(nats_server.url, [Exec(uid="old", command="before tail")]))
    out, err = tmp_path / "tail.out", tmp_path / "tail.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ringfence.cli.main", "events", "tail", "--nats-url", nats_server.url,
             "--type", "exec", "--format", "json"],
            cwd=ROOT, stdout=stdout, stderr=stderr,
        )
    try:
        wait_for(lambda: "following new audit events" in err.read_text(), 15, what="tail to subscribe")
        asyncio.run(publish(nats_server.url, [SessionNetwork(uid="skipped"), Exec(uid="new", command="during")]))
        wait_for(lambda: "during" in out.read_text(), 10, what="the new event on tail's output")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [json.loads(line)["uid"] for line in out.read_text().splitlines()] == ["new"]


def test_verify_passes_then_names_a_modified_line_and_a_cut_tail(nats_server, data_dir, services):
    start_with_events(nats_server, data_dir, services)
    ok = cli("events", "verify", "--data-dir", str(data_dir))
    assert ok.returncode == 0 and ok.stdout.strip() == f"OK: {len(EVENTS)} events verified"
    link = data_dir / "log" / "events.log"
    assert cli("events", "verify", str(link)).stdout.strip() == f"OK: {len(EVENTS)} events verified"

    day = link.resolve()
    original = day.read_bytes()
    day.write_bytes(original.replace(b'"user":"bob","login":"","sid":"s-bob"', b'"user":"eve","login":"","sid":"s-b"'))
    bad = cli("events", "verify", "--data-dir", str(data_dir))
    assert bad.returncode == 1
    assert f"ERROR: {day} line 4: hash does not match" in bad.stderr  # line 1 is the anchor

    day.write_bytes(b"".join(original.splitlines(keepends=True)[:-1]))  # the last event removed
    cut = cli("events", "verify", "--data-dir", str(data_dir))
    assert cut.returncode == 1 and "removed from the end" in cut.stderr


def test_verify_of_a_later_day_alone_chains_to_the_day_before(tmp_path):
    now = [dt.datetime(2021, 7, 22, 23, 0, tzinfo=dt.UTC)]
    writer = AuditWriter(tmp_path / "data" / "log", clock=lambda: now[0])
    writer.start()
    writer.write_batch([Incoming(encode_event(Exec(uid="d1")))])
    now[0] += dt.timedelta(hours=2)
    writer.write_batch([Incoming(encode_event(Exec(uid="d2a"))), Incoming(encode_event(Exec(uid="d2b")))])
    writer.close()
    day2 = tmp_path / "data" / "log" / "2021-07-23.00:00:00.log"
    assert cli("events", "verify", str(day2)).stdout.strip() == "OK: 2 events verified"
    assert cli("events", "verify", "--data-dir", str(tmp_path / "data")).stdout.strip() == "OK: 3 events verified"
    empty = cli("events", "verify", "--data-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 1 and "no audit log files in" in empty.stderr
