"""The sftp auditor (issue 13) on hand-built SFTP v3 packets: which operations become events,
with what paths, outcomes and byte sums; split anywhere; bounded against a hostile client;
and the contract event its dicts become."""

from __future__ import annotations

import itertools
import tracemalloc

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence.contract import events
from ringfence.hooks import sftp_audit as sa
from ringfence.hooks.sftp_audit import SftpAuditor


# --- packet builders (draft-ietf-secsh-filexfer-02) ---------------------------------------------
def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def u64(v: int) -> bytes:
    return v.to_bytes(8, "big")


def s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return u32(len(b)) + b


def pkt(kind: int, *parts: bytes) -> bytes:
    body = bytes([kind]) + b"".join(parts)
    return u32(len(body)) + body


NO_ATTRS = u32(0)
H1, H2 = b"\0\0\0\1", b"\0\0\0\2"
READ, WRITE, CREAT, TRUNC = 0x1, 0x2, 0x8, 0x10


def attrs(size=None, uid_gid=None, perms=None, times=None, extended=()) -> bytes:
    flags, out = 0, b""
    if size is not None:
        flags, out = flags | sa.ATTR_SIZE, out + u64(size)
    if uid_gid is not None:
        flags, out = flags | sa.ATTR_UIDGID, out + u32(uid_gid[0]) + u32(uid_gid[1])
    if perms is not None:
        flags, out = flags | sa.ATTR_PERMISSIONS, out + u32(perms)
    if times is not None:
        flags, out = flags | sa.ATTR_ACMODTIME, out + u32(times[0]) + u32(times[1])
    if extended:
        flags, out = flags | sa.ATTR_EXTENDED, out + u32(len(extended)) + b"".join(s(k) + s(v) for k, v in extended)
    return u32(flags) + out


def init() -> bytes:
    return pkt(sa.INIT, u32(3))


def version() -> bytes:
    return pkt(sa.VERSION, u32(3), s("posix-rename@openssh.com"), s("1"))


def open_(rid, path, pflags, a=NO_ATTRS):
    return pkt(sa.OPEN, u32(rid), s(path), u32(pflags), a)


def close(rid, h):
    return pkt(sa.CLOSE, u32(rid), s(h))


def read(rid, h, off, n):
    return pkt(sa.READ, u32(rid), s(h), u64(off), u32(n))


def write(rid, h, off, data):
    return pkt(sa.WRITE, u32(rid), s(h), u64(off), s(data))


def path_req(kind, rid, *paths, a=None):
    return pkt(kind, u32(rid), *(s(p) for p in paths), *([a] if a is not None else []))


def ext(rid, name, *parts):
    return pkt(sa.EXTENDED, u32(rid), s(name), *parts)


def status(rid, code=0, msg=""):
    return pkt(sa.STATUS, u32(rid), u32(code), s(msg), s(""))


def handle(rid, h):
    return pkt(sa.HANDLE, u32(rid), s(h))


def data(rid, payload):
    return pkt(sa.DATA, u32(rid), s(payload))


def attrs_reply(rid):
    return pkt(sa.ATTRS, u32(rid), attrs(size=5, perms=0o644))


def name_reply(rid, *names):
    return pkt(sa.NAME, u32(rid), u32(len(names)), *(s(n) + s(n) + NO_ATTRS for n in names))


def ext_reply(rid):
    return pkt(sa.EXTENDED_REPLY, u32(rid), u64(1) * 4)


def run(exchanges, auditor=None, finish=True) -> list[dict]:
    """Each exchange is (request bytes, reply bytes), fed in that order."""
    auditor = auditor or SftpAuditor()
    out = auditor.feed_request(init()) + auditor.feed_response(version())
    for request, reply in exchanges:
        out += auditor.feed_request(request)
        out += auditor.feed_response(reply)
    return out + (auditor.finish() if finish else [])


def brief(op: dict) -> tuple:
    return op["action"], op["path"], op["target_path"], op["status"], op["error"]


# --- which operations are events -------------------------------------------------------------------
UPLOAD = [
    (open_(1, "/home/u/up.bin", WRITE | CREAT | TRUNC, attrs(perms=0o644)), handle(1, H1)),
    (write(2, H1, 0, b"x" * 10), status(2)),
    (write(3, H1, 10, b"y" * 20), status(3)),
    (close(4, H1), status(4)),
]
DOWNLOAD = [
    (open_(1, "/home/u/down.bin", READ), handle(1, H2)),
    (read(2, H2, 0, 32768), data(2, b"a" * 7)),
    (read(3, H2, 7, 32768), data(3, b"b" * 3)),
    (read(4, H2, 10, 32768), status(4, 1, "End of file")),
    (close(5, H2), status(5)),
]

CASES = {
    "upload: open with its flags and mode, then close with the bytes written": (UPLOAD, [
        dict(action=1, path="/home/u/up.bin", flags=WRITE | CREAT | TRUNC, attributes={"permissions": 0o644},
             status=0, error=""),
        dict(action=2, path="/home/u/up.bin", status=0, bytes_read=0, bytes_written=30, bytes_exact=True),
    ]),
    "download: close carries the bytes read; EOF is not an event": (DOWNLOAD, [
        dict(action=1, path="/home/u/down.bin", flags=READ, attributes=None, status=0),
        dict(action=2, path="/home/u/down.bin", bytes_read=10, bytes_written=0),
    ]),
    "a refused open is an event with the server's status and message": (
        [(open_(1, "/etc/shadow", READ), status(1, 3, "Permission denied"))],
        [dict(action=1, path="/etc/shadow", status=3, error="Permission denied")]),
    "a refused write adds no bytes": ([
        (open_(1, "/f", WRITE), handle(1, H1)),
        (write(2, H1, 0, b"z" * 50), status(2, 4, "Failure")),
        (write(3, H1, 0, b"z" * 5), status(3)),
        (close(4, H1), status(4)),
    ], [dict(action=1, path="/f"), dict(action=2, path="/f", bytes_written=5)]),
    "remove, and a refusal without a message gets the status's name": ([
        (path_req(sa.REMOVE, 1, "/a"), status(1)),
        (path_req(sa.REMOVE, 2, "/b"), pkt(sa.STATUS, u32(2), u32(3))),  # v3 message left out
    ], [dict(action=11, path="/a", status=0, error=""), dict(action=11, path="/b", status=3,
                                                              error="permission denied")]),
    "mkdir with its mode, rmdir": ([
        (path_req(sa.MKDIR, 1, "/d", a=attrs(perms=0o755)), status(1)),
        (path_req(sa.RMDIR, 2, "/d"), status(2, 4, "Failure")),
    ], [dict(action=12, path="/d", attributes={"permissions": 0o755}, status=0),
        dict(action=13, path="/d", status=4, error="Failure")]),
    "rename, posix-rename and hardlink: old path, new path": ([
        (path_req(sa.RENAME, 1, "/old", "/new"), status(1)),
        (ext(2, "posix-rename@openssh.com", s("/new"), s("/newer")), status(2)),
        (ext(3, "hardlink@openssh.com", s("/newer"), s("/hard")), status(3)),
    ], [dict(action=16, path="/old", target_path="/new"), dict(action=16, path="/new", target_path="/newer"),
        dict(action=19, path="/newer", target_path="/hard")]),
    "symlink in OpenSSH's order: the link's target, then the link": (
        [(path_req(sa.SYMLINK, 1, "moved.bin", "/home/u/link"), status(1))],
        [dict(action=18, path="moved.bin", target_path="/home/u/link")]),
    "setstat with every attribute; lsetstat is a setstat too": ([
        (path_req(sa.SETSTAT, 1, "/s", a=attrs(size=9, uid_gid=(1000, 100), perms=0o600, times=(0, 86400),
                                               extended=[("k", "v")])), status(1)),
        (ext(2, "lsetstat@openssh.com", s("/l"), attrs(perms=0o700)), status(2)),
    ], [dict(action=7, path="/s", attributes={"file_size": 9, "uid": 1000, "gid": 100, "permissions": 0o600,
                                               "access_time": "1970-01-01T00:00:00Z",
                                               "modification_time": "1970-01-02T00:00:00Z"}),
        dict(action=7, path="/l", attributes={"permissions": 0o700})]),
    "fsetstat names the file its handle opened": ([
        (open_(1, "/h", WRITE), handle(1, H1)),
        (pkt(sa.FSETSTAT, u32(2), s(H1), attrs(perms=0o640)), status(2)),
        (close(3, H1), status(3)),
    ], [dict(action=1), dict(action=8, path="/h", attributes={"permissions": 0o640}), dict(action=2, path="/h")]),
    "a listing is one event at opendir; the directory's close is not an event": ([
        (path_req(sa.OPENDIR, 1, "/home/u"), handle(1, H1)),
        (pkt(sa.READDIR, u32(2), s(H1)), name_reply(2, "a", "b")),
        (pkt(sa.READDIR, u32(3), s(H1)), status(3, 1, "End of file")),
        (close(4, H1), status(4)),
        (path_req(sa.OPENDIR, 5, "/root"), status(5, 3, "Permission denied")),
    ], [dict(action=10, path="/home/u", status=0), dict(action=10, path="/root", status=3)]),
    "stat, realpath, readlink and the read-only extensions are not events": ([
        (path_req(sa.STAT, 1, "/x"), attrs_reply(1)),
        (path_req(sa.LSTAT, 2, "/x"), attrs_reply(2)),
        (path_req(sa.REALPATH, 3, "."), name_reply(3, "/home/u")),
        (path_req(sa.READLINK, 4, "/l"), name_reply(4, "/x")),
        (ext(5, "statvfs@openssh.com", s("/")), ext_reply(5)),
        (ext(6, "limits@openssh.com"), ext_reply(6)),
        (ext(7, "expand-path@openssh.com", s("~/x")), name_reply(7, "/home/u/x")),
        (ext(8, "home-directory", s("u")), name_reply(8, "/home/u")),
        (ext(9, "users-groups-by-id@openssh.com", s(u32(0)), s(u32(0))), pkt(201, u32(9), s(s("root")), s(s("root")))),
        (ext(10, "no-such-extension@example.com"), status(10, 8, "Operation unsupported")),
        (path_req(sa.REMOVE, 11, "/after"), status(11)),
    ], [dict(action=11, path="/after")]),
    "copy-data of a given length is counted on both files": ([
        (open_(1, "/src", READ), handle(1, H1)),
        (open_(2, "/dst", WRITE | CREAT), handle(2, H2)),
        (ext(3, "copy-data", s(H1), u64(0), u64(4096), s(H2), u64(0)), status(3)),
        (close(4, H1), status(4)),
        (close(5, H2), status(5)),
    ], [dict(action=1, path="/src"), dict(action=1, path="/dst"),
        dict(action=2, path="/src", bytes_read=4096, bytes_exact=True),
        dict(action=2, path="/dst", bytes_written=4096, bytes_exact=True)]),
    "copy-data to end of file makes both sums lower bounds": ([
        (open_(1, "/src", READ), handle(1, H1)),
        (open_(2, "/dst", WRITE | CREAT), handle(2, H2)),
        (ext(3, "copy-data", s(H1), u64(0), u64(0), s(H2), u64(0)), status(3)),
        (close(4, H1), status(4)),
        (close(5, H2), status(5)),
    ], [dict(action=1), dict(action=1), dict(action=2, path="/src", bytes_read=0, bytes_exact=False),
        dict(action=2, path="/dst", bytes_written=0, bytes_exact=False)]),
    "at the end: requests never answered and files never closed, with status None": ([
        (open_(1, "/w", WRITE), handle(1, H1)),
        (write(2, H1, 0, b"q" * 8), status(2)),
        (path_req(sa.REMOVE, 3, "/gone"), b""),
    ], [dict(action=1, path="/w", status=0), dict(action=11, path="/gone", status=None, error=""),
        dict(action=2, path="/w", status=None, bytes_written=8)]),
    "a request id used twice: both operations, each with its own answer, in order": ([
        (path_req(sa.REMOVE, 5, "/one") + path_req(sa.RENAME, 5, "/two", "/three"), b""),
        (b"", status(5) + status(5, 4, "Failure")),
    ], [dict(action=11, path="/one", status=0), dict(action=16, path="/two", status=4)]),
    "a reply of the wrong type is not taken for the pending request's answer": ([
        (path_req(sa.REMOVE, 7, "/r"), attrs_reply(7)),
        (b"", status(7)),
    ], [dict(action=11, path="/r", status=0)]),
}


@pytest.mark.parametrize("name", CASES)
def test_operations(name):
    exchanges, expected = CASES[name]
    got = run(exchanges)
    assert len(got) == len(expected), got
    for op, want in zip(got, expected, strict=True):
        assert {k: op[k] for k in want} == want, op


def test_every_op_has_the_contract_fields_and_becomes_an_event_with_the_original_code():
    ops = list(itertools.chain.from_iterable(run(exchanges) for exchanges, _ in CASES.values()))
    # The session's own fields come from the enforcer; `truncated` (a common field) from the auditor too.
    session_fields = set(events.AuditEvent.__struct_fields__) - {"truncated"} | {"working_directory"}
    assert all(set(op) == set(events.SFTP.__struct_fields__) - session_fields for op in ops)
    for op in ops:
        event = events.SFTP(**op, sid="s-1", login="u", working_directory="/home/u")
        assert events.decode_event(events.encode_event(event)) == event
        assert event.code == f"TS{op['action']:03d}{'E' if op['error'] else 'I'}"


# The original's codes, lib/events/codes.go (SFTPOpenCode .. SFTPLinkCode) and its SFTPAction enum.
ORIGINAL = {1: "TS001", 2: "TS002", 3: "TS003", 4: "TS004", 5: "TS005", 6: "TS006", 7: "TS007", 8: "TS008",
            9: "TS009", 10: "TS010", 11: "TS011", 12: "TS012", 13: "TS013", 14: "TS014", 15: "TS015", 16: "TS016",
            17: "TS017", 18: "TS018", 19: "TS019"}


def test_codes_follow_the_original_per_action_and_outcome():
    for action, code in ORIGINAL.items():
        assert events.SFTP(action=action).code == code + "I"
        assert events.SFTP(action=action, error="No such file", status=2).code == code + "E"
    assert events.SFTP(action=0, error="sftp audit of the client stream stopped").code == "RF1001W"
    doc = msgspec.json.decode(events.encode_event(events.SFTP(action=12, path="/d")))
    assert doc["event"] == "sftp" and doc["code"] == "TS012I" and doc["path"] == "/d"


# --- split anywhere ----------------------------------------------------------------------------------
def test_split_at_every_byte_boundary_gives_the_same_operations():
    session = UPLOAD + DOWNLOAD[:1] + [(close(9, H2), status(9))]
    requests = init() + b"".join(q for q, _ in session)
    replies = version() + b"".join(r for _, r in session)
    whole = SftpAuditor()
    expected = whole.feed_request(requests) + whole.feed_response(replies) + whole.finish()
    assert [o["action"] for o in expected] == [1, 2, 1, 2]
    for cut in range(len(requests) + 1):
        a = SftpAuditor()
        got = a.feed_request(requests[:cut]) + a.feed_request(requests[cut:])
        got += a.feed_response(replies[:cut]) + a.feed_response(replies[cut:])
        assert got + a.finish() == expected, cut
    byte_by_byte = SftpAuditor()
    got = [op for i in range(len(requests)) for op in byte_by_byte.feed_request(requests[i:i + 1])]
    got += [op for i in range(len(replies)) for op in byte_by_byte.feed_response(memoryview(replies)[i:i + 1])]
    assert got + byte_by_byte.finish() == expected


def test_a_big_write_split_across_chunks_is_counted_without_keeping_its_data():
    a = SftpAuditor()
    run([(open_(1, "/big", WRITE), handle(1, H1))], a, finish=False)
    big = write(2, H1, 0, b"d" * 200_000)
    for i in range(0, len(big), 4096):
        a.feed_request(big[i:i + 4096])
        assert a.held_bytes() <= 4 + 512
    a.feed_response(status(2))
    assert a.finish()[0]["bytes_written"] == 200_000


# --- a hostile client -------------------------------------------------------------------------------
def test_a_4gib_length_stops_the_client_stream_and_says_so():
    a = SftpAuditor()
    run([(path_req(sa.REMOVE, 1, "/before"), b"")], a, finish=False)
    ops = a.feed_request(u32(0xFFFFFFFF) + b"\x0d" * 64)
    assert a.held_bytes() < 8
    assert [o["action"] for o in ops] == [0]
    assert "client stream stopped" in ops[0]["error"] and "4294967295" in ops[0]["error"]
    assert events.SFTP(**ops[0]).code == "RF1001W"
    assert a.feed_request(path_req(sa.REMOVE, 2, "/after")) == []  # no longer read
    assert [brief(o) for o in a.feed_response(status(1))] == [(11, "/before", "", 0, "")]  # still answered


def test_a_request_whose_field_runs_past_its_packet_stops_the_client_stream():
    # sftp-server would read the path on into the next packet, act on it and exit
    ops = SftpAuditor().feed_request(init() + u32(5) + bytes([sa.REMOVE]) + u32(1) + s("/real/target"))
    assert len(ops) == 1 and ops[0]["action"] == 0 and "running past" in ops[0]["error"]


def test_garbage_from_the_server_keeps_requests_audited_without_outcome():
    a = SftpAuditor()
    run([(path_req(sa.REMOVE, 1, "/waiting"), b"")], a, finish=False)
    ops = a.feed_response(u32(0))
    assert [(o["action"], o["status"]) for o in ops] == [(0, None), (11, None)]
    assert "server stream stopped" in ops[0]["error"]
    ops = a.feed_request(path_req(sa.MKDIR, 2, "/later", a=NO_ATTRS))
    assert [brief(o) for o in ops] == [(12, "/later", "", None, "")]


def test_a_long_path_is_cut_and_marked():
    a = SftpAuditor()
    ops = run([(path_req(sa.REMOVE, 1, "/" + "é" * 5000), status(1))], a)
    assert ops[0]["truncated"] is True and len(ops[0]["path"].encode()) <= sa.MAX_PATH + 8
    assert a.counters["truncated_paths"] == 1


def test_when_too_many_requests_wait_an_event_is_written_at_once_without_outcome():
    a = SftpAuditor(max_pending=2)
    ops = run([(path_req(sa.STAT, 1, "/x") + path_req(sa.STAT, 2, "/y") + path_req(sa.REMOVE, 3, "/z"), b"")],
              a, finish=False)
    assert [brief(o) for o in ops] == [(11, "/z", "", None, "")]
    assert a.counters["untracked_requests"] == 1


def test_handles_past_the_limit_are_counted_not_followed():
    a = SftpAuditor(max_handles=1)
    ops = run([(open_(1, "/a", READ), handle(1, H1)), (open_(2, "/b", READ), handle(2, H2)),
               (close(3, H2), status(3)), (close(4, H1), status(4))], a)
    assert [(o["action"], o["path"]) for o in ops] == [(1, "/a"), (1, "/b"), (2, "/a")]
    assert a.counters["untracked_handles"] == 1 and a.counters["unknown_handles"] == 1


def test_a_write_with_an_oversized_handle_is_no_garbage_and_later_requests_are_audited():
    ops = run([(write(1, b"h" * 300, 0, b"data"), status(1, 4, "Failure")),
               (path_req(sa.REMOVE, 2, "/still-seen"), status(2))])
    assert [brief(o) for o in ops] == [(11, "/still-seen", "", 0, "")]


def test_a_flood_of_requests_keeps_memory_bounded():
    a = SftpAuditor(max_pending=1000, max_state_bytes=64 * 1024)
    flood = b"".join(path_req(sa.REMOVE, i, "/f" + "x" * 200) for i in range(5000))
    ops = a.feed_request(init() + flood)
    assert len(ops) > 0 and all(o["status"] is None for o in ops)  # not followed, but written
    assert a._n_pending <= 1000 and a._state_bytes <= 64 * 1024
    assert len(ops) + a._n_pending == 5000
    assert a.counters["untracked_requests"] == len(ops)


def test_requests_with_handles_too_long_for_sftp_server_hold_no_memory():
    huge = b"h" * 200_000  # sftp-server refuses any handle of 256 bytes or more
    stream = b"".join(read(i, huge, 0, 4096) for i in range(100))
    a = SftpAuditor()
    tracemalloc.start()
    try:
        for i in range(0, len(stream), 65536):
            a.feed_request(stream[i:i + 65536])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert a._n_pending == 100 and peak < 2 * 1024 * 1024, peak


# --- fuzz: garbage and near-valid sessions, cut anywhere ----------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ids = st.integers(0, 6)
paths = st.text(max_size=12) | st.binary(max_size=40) | st.sampled_from(["/a", "/b", "x" * 70])
handles = st.sampled_from([H1, H2, b"", b"h" * 300]) | st.binary(max_size=8)
blobs = st.binary(max_size=64)
attr_blobs = st.builds(attrs, size=st.none() | st.integers(0, 2**64 - 1), perms=st.none() | st.integers(0, 2**32 - 1),
                       times=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                       extended=st.lists(st.tuples(st.text(max_size=3), st.text(max_size=3)), max_size=2))
requests = st.one_of(
    st.builds(open_, ids, paths, st.integers(0, 63), attr_blobs),
    st.builds(close, ids, handles),
    st.builds(read, ids, handles, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.builds(write, ids, handles, st.integers(0, 2**64 - 1), blobs),
    st.builds(lambda k, r, p, a: path_req(k, r, p, a=a), st.sampled_from([sa.SETSTAT, sa.MKDIR]), ids, paths,
              attr_blobs),
    st.builds(lambda k, r, p: path_req(k, r, p), st.sampled_from([sa.REMOVE, sa.RMDIR, sa.OPENDIR, sa.STAT]), ids,
              paths),
    st.builds(lambda k, r, p, q: path_req(k, r, p, q), st.sampled_from([sa.RENAME, sa.SYMLINK]), ids, paths, paths),
    st.builds(lambda r, h, a: pkt(sa.FSETSTAT, u32(r), s(h), a), ids, handles, attr_blobs),
    st.builds(lambda r, n, p, q: ext(r, n, s(p), s(q)), ids,
              st.sampled_from(["posix-rename@openssh.com", "hardlink@openssh.com", "statvfs@openssh.com", "x"]),
              paths, paths),
    st.builds(lambda r, h1, n, h2: ext(r, "copy-data", s(h1), u64(0), u64(n), s(h2), u64(0)),
              ids, handles, st.integers(0, 2**64 - 1), handles),
    st.builds(lambda r, p, a: ext(r, "lsetstat@openssh.com", s(p), a), ids, paths, attr_blobs),
    st.builds(init),
)
replies = st.one_of(
    st.builds(status, ids, st.integers(0, 9) | st.integers(0, 2**32 - 1), st.text(max_size=8)),
    st.builds(handle, ids, handles),
    st.builds(data, ids, blobs),
    st.builds(attrs_reply, ids),
    st.builds(name_reply, ids),
    st.builds(ext_reply, ids),
    st.builds(version),
)


@st.composite
def sessions(draw) -> tuple[bytes, bytes]:
    """Requests, and for each an answer to its id (its own type or another), in order."""
    client, server = [], []
    for _ in range(draw(st.integers(0, 25))):
        request = draw(requests)
        client.append(request)
        reply = draw(replies)
        if reply[4] != sa.VERSION and draw(st.booleans()):  # mostly an answer to this request's id
            reply = reply[:5] + request[5:9] + reply[9:]
        server.append(reply)
    return draw(mutated(b"".join(client))), draw(mutated(b"".join(server)))


@st.composite
def mutated(draw, stream: bytes) -> bytes:
    stream = bytearray(stream)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        at = draw(st.integers(0, len(stream)))
        if how == "flip" and at < len(stream):
            stream[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del stream[at:at + draw(st.integers(1, 9))]
        elif how == "insert":
            stream[at:at] = draw(st.binary(min_size=1, max_size=9))
        else:
            stream[at:at] = u32(draw(st.sampled_from([0, 1, 2**18, 2**18 + 1, 2**31, 2**32 - 1])))
    return bytes(stream)


limits = st.fixed_dictionaries({}, optional={
    "max_pending": st.integers(1, 5), "max_handles": st.integers(0, 3), "max_state_bytes": st.integers(0, 300),
    "max_path": st.integers(1, 20), "max_packet": st.integers(1, 2000)})


def chunks(draw, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


@FUZZ
@given(st.data(), sessions() | st.tuples(st.binary(max_size=300), st.binary(max_size=300)), limits)
def test_fuzz_never_breaks_and_stays_bounded(draw, streams, caps):
    client, server = streams
    a = SftpAuditor(**caps)
    ups, downs = chunks(draw.draw, client), chunks(draw.draw, server)
    ops = []
    for i in range(max(len(ups), len(downs))):
        if i < len(ups):
            ops += a.feed_request(ups[i])
        if i < len(downs):
            ops += a.feed_response(downs[i])
        assert a.held_bytes() <= 2 * (4 + caps.get("max_packet", sa.MAX_PACKET))
        assert a._n_pending <= caps.get("max_pending", sa.MAX_PENDING)
        assert len(a._handles) <= caps.get("max_handles", sa.MAX_HANDLES)
        assert 0 <= a._state_bytes <= caps.get("max_state_bytes", sa.MAX_STATE_BYTES)
    ops += a.finish()
    assert a._n_pending == 0 and a._state_bytes == 0 and not a._handles
    for op in ops:
        assert "internal error" not in op["error"], op
        assert len(op["path"].encode("utf-8", "surrogatepass")) <= 4 * caps.get("max_path", sa.MAX_PATH)
        events.encode_event(events.SFTP(**op))

