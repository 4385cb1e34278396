"""Pure parts of session recordings: chunk checks, write order, paging, playback timing."""

from __future__ import annotations

import datetime as dt
import io
import re

import msgspec
import pytest

from ringfence.cli import sessions
from ringfence.contract import names, recording
from ringfence.contract.api import ApiError
from ringfence.contract.recording import CastHeader, RecordingChunk, RecordingGetRequest, RecordingListRequest
from services.audit import recording_core as rc
from services.audit.core import Rejected


def enc(**kw) -> bytes:
    return msgspec.json.encode({"sid": "s-1", "seq": 0, "server_id": "n1", **kw})


@pytest.mark.parametrize(
    ("data", "subject", "reason"),
    [
        (b"\x00\xff", "", "not a valid recording chunk"),
        (b'{"seq": 0}', "", "not a valid recording chunk"),  # no sid
        (enc(seq="1"), "", "not a valid recording chunk"),
        (enc(events=[[0, "o"]]), "", "not a valid recording chunk"),
        (enc(events=[[0, "o", "x" * recording.MAX_CHUNK_BYTES]]), "", "the limit is 262144"),
        (enc(sid="../x"), "", 'sid: "../x" is not a valid session id'),
        (enc(sid="a.b"), "", "is not a valid session id"),
        (enc(sid=""), "", "is not a valid session id"),
        (enc(), "ringfence.recording.n1.s-2", "does not match the subject"),
        (enc(server_id="n2"), "ringfence.recording.n1.s-1", "does not match the subject"),
        (enc(seq=-1), "", "seq: -1 is out of range"),
        (enc(seq=3, header={}), "", "only seq 0 may carry the header"),
        (enc(header={"version": 1}), "", "header.version: 1"),
        (enc(events=[[-0.5, "o", "x"]]), "", "events[0]: time -0.5"),
        (enc(events=[[0, "o", "x"], [1, "", "x"]]), "", "events[1]: empty event code"),
    ],
)
def test_bad_chunks_are_rejected_with_the_reason(data, subject, reason):
    with pytest.raises(Rejected) as exc:
        rc.decode_chunk(data, subject)
    assert reason in str(exc.value)


def test_good_chunks_decode():
    chunk = rc.decode_chunk(enc(header={"width": 120}, events=[[0, "o", "$ "], [0.5, "r", "80x24"]], end=True),
                            names.recording_subject("n1", "s-1"))
    assert chunk.header == CastHeader(width=120)
    assert chunk.events == [(0.0, "o", "$ "), (0.5, "r", "80x24")]
    assert rc.decode_chunk(recording.encode(RecordingChunk(sid=str(_uuid()), seq=7))).seq == 7


def _uuid():
    import uuid

    return uuid.uuid4()


@pytest.mark.parametrize("sid", ["c8e0b0d5-3994-4221-b701-c1ae17d871f1", "s-1", "A_b", "x" * 128])
def test_valid_sids(sid):
    assert recording.is_valid_sid(sid)


@pytest.mark.parametrize("sid", ["", "..", "../etc", "a/b", "a.b", "-x", "_x", "x" * 129, "a\n", "a b", "*", ">"])
def test_invalid_sids(sid):
    assert not recording.is_valid_sid(sid)


def test_header_line_always_names_the_version_and_size():
    assert msgspec.json.decode(recording.header_line(CastHeader())) == {"version": 2, "width": 80, "height": 24}
    full = CastHeader(width=100, height=30, timestamp=5, title="t", env={"TERM": "xterm"})
    assert msgspec.json.decode(recording.header_line(full)) == {
        "version": 2, "width": 100, "height": 30, "timestamp": 5, "title": "t", "env": {"TERM": "xterm"}}


# --- ordering ---------------------------------------------------------------------------------------


def ch(seq: int, end: bool = False) -> RecordingChunk:
    return RecordingChunk(sid="s", seq=seq, end=end, events=[(float(seq), "o", str(seq))])


def written(adv: rc.Advance) -> list[int]:
    return [h.chunk.seq for h in adv.write]


def test_in_order_chunks_are_written_as_they_come():
    s = rc.Sequencer()
    for i in range(3):
        assert rc.offer(s, ch(i), f"t{i}", 10, 0, ident=i + 1).verdict == "held"
        assert written(rc.advance(s, now=0)) == [i]
    assert s.next_seq == 3 and not s.held and s.gap_since is None


def test_a_gap_is_held_until_it_fills():
    s = rc.Sequencer(next_seq=1)
    assert rc.offer(s, ch(3), "t3", 10, 0, ident=3).verdict == "held"
    assert rc.offer(s, ch(2), "t2", 10, 0, ident=2).verdict == "held"
    assert written(rc.advance(s, now=100)) == []
    assert s.gap_since == 100
    assert rc.offer(s, ch(1), "t1", 10, 0, ident=1).verdict == "held"
    adv = rc.advance(s, now=101)
    assert written(adv) == [1, 2, 3] and [h.token for h in adv.write] == ["t1", "t2", "t3"]
    assert s.next_seq == 4 and s.gap_since is None


def test_duplicates_and_redeliveries():
    s = rc.Sequencer(next_seq=2)
    assert rc.offer(s, ch(1), "old", 10, 0, ident=1).verdict == "duplicate"
    assert rc.offer(s, ch(4), "a", 10, 0, ident=4).verdict == "held"
    # Another message with the same seq (a re-publish): a duplicate; the held one stays.
    assert rc.offer(s, ch(4), "b", 10, 0, ident=9).verdict == "duplicate"
    # A redelivery of the held message itself: its newest handle is kept.
    o = rc.offer(s, ch(4), "c", 10, 0, ident=4)
    assert (o.verdict, o.replaced, s.held[4].token) == ("held", "a", "c")


def test_holding_is_bounded():
    s = rc.Sequencer()
    for i in range(1, rc.HOLD_MAX_CHUNKS + 1):
        assert rc.offer(s, ch(i), i, 10, 0, ident=i).verdict == "held"
    assert rc.offer(s, ch(rc.HOLD_MAX_CHUNKS + 1), "x", 10, 0, ident=999).verdict == "nak"
    # The chunk that fills the gap is always taken.
    assert rc.offer(s, ch(0), "t0", 10, 0, ident=1000).verdict == "held"
    assert written(rc.advance(s, now=0)) == list(range(rc.HOLD_MAX_CHUNKS + 1))
    assert rc.offer(rc.Sequencer(), ch(5), "x", 100, rc.HOLD_MAX_BYTES - 99, ident=5).verdict == "nak"


def test_a_gap_open_longer_than_the_wait_is_skipped():
    s = rc.Sequencer(next_seq=2)
    rc.offer(s, ch(5), "t5", 10, 0, ident=5)
    rc.offer(s, ch(6), "t6", 10, 0, ident=6)
    rc.offer(s, ch(9), "t9", 10, 0, ident=9)
    assert written(rc.advance(s, now=0, gap_wait=10)) == []
    assert written(rc.advance(s, now=9.9, gap_wait=10)) == []
    adv = rc.advance(s, now=10, gap_wait=10)
    # Seqs 2-4 are given up on; 7-8 form a new gap, timed from now.
    assert (written(adv), adv.skipped, adv.skipped_from) == ([5, 6], 3, 2)
    assert (s.next_seq, s.gap_since, sorted(s.held)) == (7, 10, [9])
    adv = rc.advance(s, now=20, gap_wait=10)
    assert (written(adv), adv.skipped, adv.skipped_from) == ([9], 2, 7)
    assert rc.offer(s, ch(3), "late", 10, 0, ident=3).verdict == "duplicate"


def test_nothing_is_written_after_the_end():
    s = rc.Sequencer()
    rc.offer(s, ch(0), "t0", 10, 0, ident=1)
    rc.offer(s, ch(1, end=True), "t1", 10, 0, ident=2)
    rc.offer(s, ch(2), "t2", 10, 0, ident=3)
    adv = rc.advance(s, now=0)
    assert written(adv) == [0, 1] and [h.chunk.seq for h in adv.after_end] == [2]
    assert s.ended and not s.held
    assert rc.offer(s, ch(3), "t3", 10, 0, ident=4).verdict == "after_end"
    assert rc.offer(s, ch(1), "t1", 10, 0, ident=2).verdict == "duplicate"


# --- times and requests ------------------------------------------------------------------------------


def test_started_ended_and_default_header():
    assert rc.started_of(RecordingChunk(sid="s", seq=0, started="2024-05-01T10:00:00Z"), 0) == "2024-05-01T10:00:00Z"
    assert rc.started_of(RecordingChunk(sid="s", seq=0, header=CastHeader(timestamp=1714557600)), 0) == (
        "2024-05-01T10:00:00.000Z")
    assert rc.started_of(RecordingChunk(sid="s", seq=3), 1714557600.5) == "2024-05-01T10:00:00.500Z"
    assert rc.ended_at("2024-05-01T10:00:00Z", 62.25, 0) == "2024-05-01T10:01:02.250Z"
    assert rc.ended_at("garbage", 1, 1714557600) == "2024-05-01T10:00:00.000Z"
    assert rc.default_header("2024-05-01T10:00:00Z", 0) == CastHeader(timestamp=1714557600)
    assert rc.default_header("", 7.9) == CastHeader(timestamp=7)


def test_request_validation():
    with pytest.raises(ApiError, match="limit: 0 is out of range"):
        rc.validate_list(RecordingListRequest(limit=0))
    with pytest.raises(ApiError, match="limit: 1001"):
        rc.validate_list(RecordingListRequest(limit=1001))
    with pytest.raises(ApiError, match=re.escape('sid: "../../x" is not a valid session id')) as exc:
        rc.validate_get(RecordingGetRequest(sid="../../x"))
    assert exc.value.kind == "invalid"
    with pytest.raises(ApiError, match="offset: -1"):
        rc.validate_get(RecordingGetRequest(sid="s", offset=-1))
    with pytest.raises(ApiError, match="limit: 0"):
        rc.validate_get(RecordingGetRequest(sid="s", limit=0))


@pytest.mark.parametrize("limit", range(4, 12))
def test_pages_cut_at_lines_or_whole_characters_and_concatenate_exactly(limit):
    text = '{"version": 2}\n[0.1,"o","a\u00e9\u2713\U0001f600b"]\n[0.2,"o","\U0001f600\U0001f600"]\n'.encode()
    offset, pages = 0, []
    while offset < len(text):
        raw = text[offset : offset + limit]
        page = rc.cut_page(raw, at_end=offset + len(raw) >= len(text))
        assert page, "every page makes progress"
        page.decode()  # whole characters only
        pages.append(page)
        offset += len(page)
    assert b"".join(pages) == text


def test_a_page_ends_at_the_last_whole_line_when_it_has_one():
    assert rc.cut_page(b"aaa\nbbb\ncc", at_end=False) == b"aaa\nbbb\n"
    assert rc.cut_page(b"aaa\nbbb\ncc", at_end=True) == b"aaa\nbbb\ncc"


# --- the CLI's formatting and playback ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (0.4, "0s"), (1, "1s"), (59.6, "1m0s"), (63, "1m3s"), (3725, "1h2m5s")]
)
def test_durations(seconds, text):
    assert sessions.duration(seconds) == text


def test_idle():
    now = dt.datetime(2024, 5, 1, 10, 1, 3, tzinfo=dt.UTC)
    assert sessions.idle("2024-05-01T10:00:00Z", now) == "1m3s"
    assert sessions.idle("2024-05-01T10:00:00.000+00:00", now) == "1m3s"
    assert sessions.idle("", now) == "-"
    assert sessions.idle("garbage", now) == "-"
    assert sessions.idle("2024-05-01T10:05:00Z", now) == "0s"  # a clock ahead of ours


def test_schedule_scales_and_caps_pauses_and_plays_output_only():
    events = [(0.5, "o", "a"), (1.0, "i", "x"), (10.0, "r", "80x24"), (11.0, "o", "b"), (11.5, "o", "c")]
    assert sessions.schedule(events, 1.0, None) == [(0.5, "a"), (11.0, "b"), (11.5, "c")]
    assert sessions.schedule(events, 2.0, None) == [(0.25, "a"), (5.5, "b"), (5.75, "c")]
    # Pauses over 2 s become 2 s: 0.5, +0.5 (input), +2 (resize), +1, +0.5.
    assert sessions.schedule(events, 1.0, 2.0) == [(0.5, "a"), (4.0, "b"), (4.5, "c")]


def test_replay_waits_for_each_event_against_the_start():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(round(s, 6))
        now[0] += s + 0.01  # sleeps overshoot; the next wait makes up for it

    out = io.BytesIO()
    sessions.replay([(0.0, "a"), (1.0, "é"), (1.5, "c")], out=out, clock=lambda: now[0], sleep=sleep)
    assert out.getvalue() == "aéc".encode()
    assert slept == [1.0, 0.49]


def test_sessions_subcommands_can_be_added():
    from ringfence.cli.main import build_parser

    def run(_args):
        return 0

    sessions.add_subcommand("kill-test", "test only", lambda p: p.add_argument("sid"), run)
    try:
        args = build_parser().parse_args(["sessions", "kill-test", "abc", "--nats-url", "nats://x:1"])
        assert (args.func, args.sid, args.nats_url) == (run, "abc", "nats://x:1")
        with pytest.raises(ValueError):
            sessions.add_subcommand("kill-test", "again", lambda p: None, run)
    finally:
        sessions.SUBCOMMANDS[:] = [s for s in sessions.SUBCOMMANDS if s.name != "kill-test"]
