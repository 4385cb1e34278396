"""Session recordings end to end: chunks published as the enforcer publishes them, the real
audit service writing .cast files, and `ringfence sessions ls --ended` / `ringfence play` as
subprocesses."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
import subprocess
import sys
import threading
import time
import uuid

import msgspec
import nats

from ringfence.cli.status import discover
from ringfence.contract import names, recording
from ringfence.contract.api import ApiReply
from ringfence.contract.recording import (
    CastHeader,
    RecordingChunk,
    RecordingGetRequest,
    RecordingGetResult,
    parse_cast,
)
from ringfence.contract.streams import ensure_streams
from ringfence.runtime.audit_publish import MSG_ID_HEADER
from services.audit.adapter import instance_id
from services.audit.recording_adapter import recording_consumer_config
from services.audit.recording_core import GAP_WAIT
from tests.support.procs import ROOT, wait_for


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args], cwd=ROOT, capture_output=True,
                          timeout=timeout)


def cast_file(data_dir, sid: str):
    return data_dir / "recordings" / f"{sid}.cast"


def chunk_msg(chunk: RecordingChunk, msg_id: str | None = None) -> tuple[str, bytes, str]:
    subject = names.recording_subject(chunk.server_id or "srv-1", chunk.sid)
    return subject, recording.encode(chunk), msg_id or recording.msg_id(chunk)


async def publish_raw(url: str, items: list[tuple[str, bytes, str]]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for subject, data, msg_id in items:
            await js.publish(subject, data, headers={MSG_ID_HEADER: msg_id})
    finally:
        await nc.close()


def publish(url: str, chunks: list[RecordingChunk]) -> None:
    asyncio.run(publish_raw(url, [chunk_msg(c) for c in chunks]))


def counters(url: str) -> dict[str, int]:
    async def ask():
        nc = await nats.connect(url)
        try:
            found = await discover(nc, "STATS", wait=0.5)
        finally:
            await nc.close()
        [audit] = [i for i in found if i["name"] == names.service_name("audit")]
        data: dict[str, int] = {}
        for ep in audit["endpoints"]:
            data.update(ep.get("data") or {})
        return data

    return asyncio.run(ask())


def request(url: str, verb: str, body: bytes) -> ApiReply:
    async def ask():
        nc = await nats.connect(url)
        try:
            msg = await nc.request(names.api_subject(names.AUDIT_API, verb), body, timeout=10)
        finally:
            await nc.close()
        return msgspec.json.decode(msg.data, type=ApiReply)

    return asyncio.run(ask())


def ended(url: str) -> list[dict]:
    r = cli("sessions", "ls", "--ended", "--format", "json", "--nats-url", url)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_ended(url: str, sid: str, timeout: float = 30) -> dict:
    def find():
        return next((x for x in ended(url) if x["sid"] == sid and x.get("ended")), None)

    return wait_for(find, timeout, interval=0.2, what=f"recording {sid} to end")


def session(sid: str, events_per_chunk: list[list[tuple[float, str, str]]], **meta) -> list[RecordingChunk]:
    """Chunks as the enforcer publishes them: the header on seq 0, end on the last."""
    meta = {"user": "alice", "login": "root", "server_id": "srv-1", "server_hostname": "node-1",
            "started": "2024-05-01T10:00:00.000Z", **meta}
    out = []
    for seq, events in enumerate(events_per_chunk):
        header = CastHeader(width=100, height=30, timestamp=1714557600, env={"TERM": "xterm"}) if seq == 0 else None
        out.append(RecordingChunk(sid=sid, seq=seq, events=events, header=header,
                                  end=seq == len(events_per_chunk) - 1, **meta))
    return out


EVENTS = [
    [(0.0, "o", "$ ")],
    [(0.2, "i", "e"), (0.4, "o", "echo hi\r\n"), (0.5, "o", "hi\r\n")],
    [(0.9, "r", "100x40"), (1.5, "o", "unicode ✓ \x1b[1mbold\x1b[0m \"quoted\" back\\slash\r\n")],
    [(2.0, "o", "$ exit\r\n")],
]


def test_a_recording_is_stored_listed_played_and_round_trips(nats_server, data_dir, services, tmp_path):
    services("audit")
    url = nats_server.url
    sid = str(uuid.uuid4())
    publish(url, session(sid, EVENTS))
    info = wait_ended(url, sid)

    path = cast_file(data_dir, sid)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    header, events = parse_cast(path.read_text())
    assert header == {"version": 2, "width": 100, "height": 30, "timestamp": 1714557600, "env": {"TERM": "xterm"}}
    assert events == [tuple(e) for chunk in EVENTS for e in chunk]

    assert {k: info[k] for k in ("user", "login", "server_id", "server_hostname", "started", "duration")} == {
        "user": "alice", "login": "root", "server_id": "srv-1", "server_hostname": "node-1",
        "started": "2024-05-01T10:00:00.000Z", "duration": 2.0}
    assert info["ended"] == "2024-05-01T10:00:02.000Z"
    assert info["bytes"] == path.stat().st_size

    table = cli("sessions", "ls", "--ended", "--nats-url", url)
    assert table.returncode == 0, table.stderr
    head, row = table.stdout.decode().splitlines()
    assert head.split() == ["SID", "USER", "LOGIN", "NODE", "STARTED", "DURATION"]
    assert row.split() == [sid, "alice", "root", "node-1", "2024-05-01T10:00:00Z", "2s"]

    played = cli("play", sid, "--speed", "100", "--nats-url", url)
    assert played.returncode == 0, played.stderr
    assert played.stdout.decode() == "".join(d for chunk in EVENTS for _t, code, d in chunk if code == "o")

    raw = cli("play", sid, "--format", "cast", "--nats-url", url)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == path.read_bytes()
    saved = tmp_path / "s.cast"
    saved.write_bytes(raw.stdout)
    assert parse_cast(saved.read_text()) == (header, events)

    # Tiny pages cut inside lines and inside multi-byte characters still concatenate exactly.
    text, offset, pages = "", 0, 0
    while True:
        reply = request(url, "recording", msgspec.json.encode(RecordingGetRequest(sid=sid, offset=offset, limit=5)))
        assert reply.ok, reply.error
        page = msgspec.json.decode(reply.result, type=RecordingGetResult)
        text, offset, pages = text + page.data, page.next_offset, pages + 1
        if page.complete:
            break
    assert text.encode() == path.read_bytes() and offset == path.stat().st_size
    assert pages > len(text.encode()) // 5


def test_play_takes_the_recorded_time_divided_by_speed(nats_server, data_dir, services):
    services("audit")
    url = nats_server.url
    sid = "timed-1"
    # 100 seconds of session: at --speed 100 one second of playback, at --max-idle 0.5 under 0.1 s.
    publish(url, session(sid, [[(0.0, "o", "a")], [(40.0, "o", "b")], [(70.0, "o", "c"), (100.0, "o", "d")]]))
    wait_ended(url, sid)

    def timed(*extra: str) -> tuple[float, str]:
        start = time.monotonic()
        r = cli("play", sid, "--nats-url", url, *extra)
        assert r.returncode == 0, r.stderr
        return time.monotonic() - start, r.stdout.decode()

    baseline, _ = timed("--speed", "100", "--max-idle", "0.5")
    elapsed, out = timed("--speed", "100")
    assert out == "abcd"
    assert elapsed >= 1.0
    assert 0.7 < elapsed - baseline < 2.0, (elapsed, baseline)


def test_duplicates_and_out_of_order_chunks_are_written_once_in_order(nats_server, data_dir, services):
    services("audit")
    url = nats_server.url
    sid = "dup-1"
    chunks = session(sid, [[(float(i), "o", f"line {i}\n")] for i in range(6)])
    items = [
        chunk_msg(chunks[0]),
        chunk_msg(chunks[2]),  # a gap: held until seq 1 arrives
        chunk_msg(chunks[1]),
        chunk_msg(chunks[1], "another-id-1"),  # past the stream's duplicate window: the writer drops it
        chunk_msg(chunks[0], "another-id-0"),
        chunk_msg(chunks[2]),  # same msg id: dropped by the stream
        chunk_msg(chunks[4]),
        chunk_msg(chunks[3]),
        chunk_msg(chunks[5]),
        chunk_msg(chunks[5], "another-id-5"),
    ]
    asyncio.run(publish_raw(url, items))
    wait_ended(url, sid)
    _header, events = parse_cast(cast_file(data_dir, sid).read_text())
    assert [e[2] for e in events] == [f"line {i}\n" for i in range(6)]
    wait_for(lambda: counters(url)["recording_duplicates_skipped"] == 3, what="3 duplicates counted")
    assert counters(url)["recording_chunks_written"] == 6


def test_a_gap_that_never_fills_is_skipped_and_a_missing_header_is_supplied(nats_server, data_dir, services):
    services("audit")
    url = nats_server.url
    gap = session("gap-1", [[(float(i), "o", f"{i}")] for i in range(5)])
    headless = session("headless-1", [[(float(i), "o", f"{i}")] for i in range(3)])
    publish(url, [gap[0], gap[1], gap[3], gap[4], headless[1], headless[2]])  # seq 2 and seq 0 never come
    time.sleep(GAP_WAIT / 2)
    assert [e[2] for e in parse_cast(cast_file(data_dir, "gap-1").read_text())[1]] == ["0", "1"]  # still holding
    assert not cast_file(data_dir, "headless-1").exists()

    wait_ended(url, "gap-1", GAP_WAIT + 20)
    assert [e[2] for e in parse_cast(cast_file(data_dir, "gap-1").read_text())[1]] == ["0", "1", "3", "4"]
    wait_ended(url, "headless-1", 20)
    header, events = parse_cast(cast_file(data_dir, "headless-1").read_text())
    assert header == {"version": 2, "width": 80, "height": 24, "timestamp": 1714557600}
    assert [e[2] for e in events] == ["1", "2"]
    assert counters(url)["recording_gaps_skipped"] == 2

    # The missing chunk arriving late is a duplicate now, not written out of order.
    publish(url, [gap[2]])
    wait_for(lambda: counters(url)["recording_rejected"] + counters(url)["recording_duplicates_skipped"] >= 1,
             what="the late chunk to be settled")
    assert [e[2] for e in parse_cast(cast_file(data_dir, "gap-1").read_text())[1]] == ["0", "1", "3", "4"]


def test_bad_chunks_are_dead_lettered_and_good_ones_still_flow(nats_server, data_dir, services):
    services("audit")
    url = nats_server.url
    big = RecordingChunk(sid="big-1", seq=0, header=CastHeader(), server_id="srv-1",
                         events=[(0.0, "o", "x" * (recording.MAX_CHUNK_BYTES + 1))])
    items = [
        (names.recording_subject("srv-1", "junk-1"), b"\x00\xffnot json", "j1"),
        chunk_msg(big),
        (names.recording_subject("srv-1", "other-1"),
         recording.encode(RecordingChunk(sid="mismatch-1", seq=0, server_id="srv-1")), "m1"),
        chunk_msg(RecordingChunk(sid="hdr-1", seq=1, header=CastHeader(), server_id="srv-1")),
        chunk_msg(RecordingChunk(sid="neg-1", seq=0, events=[(-1.0, "o", "x")], server_id="srv-1")),
        (names.recording_subject("srv-1", "dots"),
         recording.encode(RecordingChunk(sid="../../etc/passwd", seq=0, server_id="srv-1")), "t1"),
    ]
    asyncio.run(publish_raw(url, items))
    publish(url, session("good-1", EVENTS))
    wait_ended(url, "good-1")
    wait_for(lambda: counters(url)["recording_rejected"] == len(items), what="every bad chunk dead-lettered")
    rejected = [json.loads(x) for x in (data_dir / "recordings" / "rejected.log").read_text().splitlines()]
    assert len(rejected) == len(items)
    reasons = " | ".join(r["reason"] for r in rejected)
    for part in ("not a valid recording chunk", "the limit is", "does not match the subject",
                 "only seq 0 may carry the header", "time -1.0", "not a valid session id"):
        assert part in reasons
    assert sorted(p.name for p in (data_dir / "recordings").glob("*.cast")) == ["good-1.cast"]
    assert not list(data_dir.parent.rglob("passwd*"))


def test_unknown_and_malicious_sids_are_refused(nats_server, data_dir, services):
    services("audit")
    url = nats_server.url
    (data_dir / "recordings" / "secret.txt").write_text("not a recording")
    for sid in ("../log/events", "..", "a/b", "secret.txt", "x" * 200, ""):
        reply = request(url, "recording", msgspec.json.encode(RecordingGetRequest(sid=sid)))
        assert (reply.ok, reply.kind) == (False, "invalid"), sid
        assert "not a valid session id" in reply.error
    reply = request(url, "recording", msgspec.json.encode(RecordingGetRequest(sid="no-such-session")))
    assert (reply.ok, reply.kind) == (False, "not_found")

    r = cli("play", "no-such-session", "--nats-url", url)
    assert r.returncode == 1
    assert r.stderr.decode().strip() == 'ERROR: no recording of session "no-such-session"'
    r = cli("play", "../log/events", "--nats-url", url)
    assert r.returncode == 1 and "is not a session id" in r.stderr.decode()


def test_a_long_recording_is_fetched_in_pages(nats_server, data_dir, services):
    services("audit")
    url = nats_server.url
    sid = "long-1"
    # ~3 MiB of output, several pages of at most 512 KiB; multi-byte characters across page cuts.
    text = "é✓" * 20000
    chunks = session(sid, [[(i * 0.001, "o", f"{i}:{text}\n")] for i in range(30)])
    publish(url, chunks)
    wait_ended(url, sid)
    raw = cli("play", sid, "--format", "cast", "--nats-url", url)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == cast_file(data_dir, sid).read_bytes()
    assert len(raw.stdout) > 3 * 512 * 1024
    played = cli("play", sid, "--speed", "1000", "--nats-url", url)
    assert played.stdout.decode() == "".join(f"{i}:{text}\n" for i in range(30))


async def _consumer_with_short_ack_wait(url: str, data_dir, seconds: float) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        config = recording_consumer_config(instance_id(data_dir))
        config.ack_wait = seconds
        await js.add_consumer(names.RECORDINGS_STREAM, config=config)
    finally:
        await nc.close()


def restart(proc) -> None:
    seen = len(proc.output())
    proc.start()
    wait_for(lambda: "service ready" in proc.output()[seen:], 30, what=f"{proc.name} to be ready again")


def test_sigkill_mid_stream_writes_every_chunk_exactly_once(nats_server, data_dir, services):
    per_session, sids = 400, [f"kill-{i}" for i in range(4)]
    asyncio.run(_consumer_with_short_ack_wait(nats_server.url, data_dir, 2.0))
    [audit] = services("audit")
    plans = {sid: session(sid, [[(seq * 0.01, "o", f"{sid} chunk {seq}\n")] for seq in range(per_session)])
             for sid in sids}
    # Interleaved across sessions, as several nodes would publish.
    chunks = [plans[sid][seq] for seq in range(per_session) for sid in sids]

    def lines() -> int:
        return sum(p.read_bytes().count(b"\n") for p in (data_dir / "recordings").glob("*.cast"))

    async def paced():
        for start in range(0, len(chunks), 16):
            await publish_raw(nats_server.url, [chunk_msg(c) for c in chunks[start : start + 16]])
            await asyncio.sleep(0.02)

    publisher = threading.Thread(target=lambda: asyncio.run(paced()))
    publisher.start()
    try:
        for threshold in (200, 800):
            wait_for(lambda t=threshold: lines() >= t, 60, what=f"{threshold} lines")
            audit.kill()
            assert lines() < len(chunks), "the kill must land mid-stream"
            restart(audit)
    finally:
        publisher.join()
    for sid in sids:
        wait_ended(nats_server.url, sid, 60)
    time.sleep(3)  # longer than ack_wait: any redelivery would have landed
    for sid in sids:
        header, events = parse_cast(cast_file(data_dir, sid).read_text())
        assert header["width"] == 100
        assert [e[2] for e in events] == [f"{sid} chunk {seq}\n" for seq in range(per_session)]


def put_sessions(url: str, entries: dict[str, bytes], delete: tuple[str, ...] = ()) -> None:
    async def put():
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            kv = await js.key_value(names.SESSIONS_BUCKET)
            for key, value in entries.items():
                await kv.put(key, value)
            for key in delete:
                await kv.delete(key)
        finally:
            await nc.close()

    asyncio.run(put())


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_sessions_ls_lists_the_sessions_bucket_with_idle_times(nats_server):
    from ringfence.contract.api import SessionInfo

    url = nats_server.url
    r = cli("sessions", "ls", "--nats-url", url)  # no bucket yet: an empty table
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["SID", "USER", "LOGIN", "NODE", "CLIENT", "STARTED", "IDLE"]

    now = dt.datetime.now(dt.UTC)
    a = SessionInfo(sid="sid-a", user="alice@example.com", login="root", server_id="s1", server_hostname="node-1",
                    started="2024-05-01T10:00:00.000Z", addr_remote="10.0.0.5:51234",
                    last_active=rfc3339(now - dt.timedelta(seconds=63)), interactive=True)
    b = SessionInfo(sid="sid-b", user="bob", login="bob", server_id="s2", server_hostname="node-2",
                    started="2024-05-01T09:00:00.000Z")
    gone = SessionInfo(sid="sid-c", user="carol", login="carol", server_id="s2", server_hostname="node-2",
                       started="2024-05-01T11:00:00.000Z")
    put_sessions(url, {s.sid: msgspec.json.encode(s) for s in (a, b, gone)}, delete=("sid-c",))

    r = cli("sessions", "ls", "--nats-url", url)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.decode().splitlines()]
    assert rows[0] == ["SID", "USER", "LOGIN", "NODE", "CLIENT", "STARTED", "IDLE"]
    assert rows[1] == ["sid-b", "bob", "bob", "node-2", "-", "2024-05-01T09:00:00Z", "-"]
    assert rows[2][:6] == ["sid-a", "alice@example.com", "root", "node-1", "10.0.0.5:51234", "2024-05-01T10:00:00Z"]
    assert rows[2][6] in ("1m3s", "1m4s", "1m5s")  # the CLI starts a moment after `now`
    assert len(rows) == 3

    r = cli("sessions", "ls", "--format", "json", "--nats-url", url)
    found = json.loads(r.stdout)
    assert [msgspec.convert(x, SessionInfo) for x in found] == [b, a]


def test_a_recording_still_being_written_plays_what_is_stored(nats_server, data_dir, services):
    services("audit")
    url = nats_server.url
    sid = "open-1"
    publish(url, session(sid, [[(0.0, "o", "a")], [(1.0, "o", "b")], [(2.0, "o", "never")]])[:2])
    wait_for(lambda: [e[2] for e in parse_cast(cast_file(data_dir, sid).read_text())[1]] == ["a", "b"],
             what="the first two chunks")
    r = cli("sessions", "ls", "--ended", "--nats-url", url)
    assert r.stdout.decode().splitlines()[1].split()[-2:] == ["1s", "(open)"]
    played = cli("play", sid, "--speed", "100", "--nats-url", url)
    assert (played.returncode, played.stdout) == (0, b"ab")
    assert "has no end yet" in played.stderr.decode()
