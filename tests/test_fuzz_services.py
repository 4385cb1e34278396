"""Fuzzing the live services (issue 7): random, garbage and oversized payloads (up to
the NATS max payload) on every API subject of real policy, locks and audit services,
and garbage lines on the enforcer's session socket. Every reply is a well-formed error
naming the problem (never an internal error or a traceback in the log), and each
service still answers a good request afterwards."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence.contract import api, names
from tests.support.fuzz import TEMPLATES, json_values, mutated, texts
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.timeout(120)

# Services run without operator authentication here: the requests are unsigned on purpose.
NO_AUTH = {"RINGFENCE_OPERATOR_AUTH": "off"}

SUBJECTS = {
    "policy": [names.api_subject(names.POLICY_API, v) for v in ("create", "get", "delete")],
    "locks": [names.api_subject(names.LOCKS_API, v) for v in ("create", "lock", "get", "delete", "unlock")],
    "audit": [names.api_subject(names.AUDIT_API, v) for v in ("search", "recordings", "recording")],
}
ALL_SUBJECTS = [s for subjects in SUBJECTS.values() for s in subjects]
ERROR_KINDS = {"invalid", "not_found", "access_denied", "conflict", "unavailable"}  # never "internal"

# Request bodies shaped like the real ones, with random values.
request_bodies = (
    st.builds(lambda docs, dry: {"resources": docs, "dry_run": dry}, st.lists(mutated(TEMPLATES) | json_values,
                                                                            max_size=3), json_values)
    | st.fixed_dictionaries({"kind": texts | json_values}, optional={"name": texts | json_values})
    | st.fixed_dictionaries({"target": st.dictionaries(texts, texts | json_values, max_size=3)},
                            optional={"message": texts, "ttl": texts | json_values, "expires": texts | json_values})
    | st.fixed_dictionaries({}, optional={"start": texts, "end": texts, "event_types": st.lists(texts, max_size=3),
                                          "user": texts, "sid": texts, "limit": json_values | st.integers(),
                                          "order": texts, "start_key": texts})
    | st.fixed_dictionaries({"sid": texts}, optional={"offset": st.integers() | json_values,
                                                      "limit": st.integers() | json_values})
)

GARBAGE = [b"", b"\x00", b"\xff\xfe", b"null", b"[]", b"1", b'"x"', b"{", b'{"kind":"\xff"}',
           b'{"kind":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
           b'{"resources":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}", b'{"resources":["\xed\xa0\x80"]}',
           b'{"resources":[1e999]}', b'{"start_key":"99999999999999999999.1"}', b'{"limit":1e999}',
           b'{"sid":"s-1","offset":123456789012345678901234567890}']


def oversized(max_payload: int) -> list[bytes]:
    """Bodies just under the max payload (the request's headers need a little room)."""
    n = max_payload - 4096
    big = "x" * (n - 200)
    return [
        b"\xff" * n,
        json.dumps({"kind": big, "name": big[:100]}).encode(),
        json.dumps({"kind": "role", "name": big}).encode(),
        json.dumps({"resources": [{"kind": "role", "version": "v5", "metadata": {"name": big}}]}).encode(),
        json.dumps({"target": {"user": big}, "ttl": "1h"}).encode(),
        json.dumps({"event_types": [big], "start_key": "1.1"}).encode(),
    ]


def check_reply(data: bytes, garbage: bool) -> api.ApiReply:
    reply = msgspec.json.decode(data, type=api.ApiReply)
    if garbage:
        assert not reply.ok, data[:300]
    if not reply.ok:
        assert reply.error.strip(), data[:300]
        assert reply.kind in ERROR_KINDS, reply
        assert "Traceback" not in reply.error
    return reply


def no_tracebacks(procs) -> None:
    for p in procs:
        assert p.proc is not None and p.proc.poll() is None, f"{p.name} died:\n{p.output()[-3000:]}"
        assert "Traceback" not in p.output(), f"{p.name} logged a traceback:\n{p.output()[-6000:]}"


async def good_requests(nc) -> None:
    role = {"kind": "role", "version": "v5", "metadata": {"name": "after-fuzz"}}
    body = msgspec.json.encode({"resources": [role]})
    for subject, payload in [
        (names.api_subject(names.POLICY_API, "create"), body),
        (names.api_subject(names.POLICY_API, "get"), b'{"kind":"role","name":"after-fuzz"}'),
        (names.api_subject(names.LOCKS_API, "lock"), b'{"target":{"user":"after-fuzz"},"ttl":"1h"}'),
        (names.api_subject(names.LOCKS_API, "get"), b'{"kind":"lock"}'),
        (names.api_subject(names.AUDIT_API, "search"), b'{"limit":5}'),
        (names.api_subject(names.AUDIT_API, "recordings"), b"{}"),
    ]:
        reply = msgspec.json.decode((await nc.request(subject, payload, timeout=10)).data, type=api.ApiReply)
        assert reply.ok, (subject, reply)


def test_policy_locks_and_audit_answer_garbage_with_clear_errors(nats_server, services):
    procs = services("policy", "locks", "audit", env=NO_AUTH)
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(nats_server.url))

    def request(subject: str, payload: bytes) -> bytes:
        return loop.run_until_complete(nc.request(subject, payload, timeout=15)).data

    try:
        for subject in ALL_SUBJECTS:
            for payload in GARBAGE + oversized(nc.max_payload):
                # An empty body asks the audit service for its defaults.
                garbage = not payload.startswith(b"{") or b"\xff" in payload or b"1e999" in payload
                check_reply(request(subject, payload), garbage=garbage and payload != b"")

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(ALL_SUBJECTS), st.binary(max_size=300))
        def random_bytes(subject, payload):
            is_object = payload.lstrip()[:1] == b"{"
            check_reply(request(subject, payload), garbage=not is_object and payload != b"")

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(ALL_SUBJECTS), request_bodies | json_values)
        def random_json(subject, body):
            check_reply(request(subject, msgspec.json.encode(body)), garbage=not isinstance(body, dict))

        random_bytes()
        random_json()
        loop.run_until_complete(good_requests(nc))
    finally:
        loop.run_until_complete(nc.close())
        loop.close()
    no_tracebacks(procs)


# --- the enforcer's session socket ---------------------------------------------------------------------------


def socket_request(path, data: bytes, timeout: float = 15) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the enforcer answered and closed before reading everything
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply[:300]
    return json.loads(reply)


def is_session_request(line: bytes) -> bool:
    """Would this line open a session? (Random valid requests from root could place any pid.)"""
    try:
        msgspec.json.decode(line.strip() or b"x", type=api.OpenSessionRequest)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


@pytest.mark.bpf
def test_enforcer_socket_answers_garbage_with_clear_errors(enforcer):
    node = enforcer()
    sock = node.data_dir / "enforcer.sock"
    fixed = [b"\n", b"\xff\xfe\n", b"null\n", b"[]\n", b"{\n", b'{"user":"\xff"}\n', b'{"pid":"x"}\n',
             b'{"kind":"nope"}\n', b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
             b"x" * (2 * 1024 * 1024) + b"\n", b"{" * (1024 * 1024 + 10), b'{"command":[1,2]}']
    for line in fixed:
        reply = socket_request(sock, line)
        assert reply["ok"] is False and reply["error"], reply

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=200) | st.builds(lambda v: msgspec.json.encode(v), json_values))
    def random_lines(data):
        line = data.replace(b"\n", b" ") + b"\n"
        if is_session_request(line):
            return
        reply = socket_request(sock, line)
        assert reply["ok"] is False and reply["error"].strip(), reply
        assert "internal error" not in reply["error"], reply

    random_lines()
    # Still opens sessions.
    result = subprocess.run([sys.executable, "-m", "ringfence.cli.main", "run", "--data-dir", str(node.data_dir),
                             "--", "echo", "still-works"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "still-works", result.stderr
    assert node.proc.proc.poll() is None
    assert "Traceback" not in node.log(), node.log()[-6000:]


# A session's wrapper sends garbage to its relay after the session opened: none of it is
# taken as anything (the relay reads the terminal size itself), the program runs to its end
# and the exit status still comes back.
UPDATE_HELPER = r"""
import sys
sys.path.insert(0, sys.argv[2])
from ringfence.hooks import wire
sock, lines, reply = wire.open_session(sys.argv[1], {"kind": "local", "command": ["sh", "-c", "sleep 0.5; exit 7"]},
                                       (0, 1, 2))
for line in (b"\xff\xfe", b'{"exit":0}', b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}", b"null",
             b'{"winch":1e999}', b"x" * 1000000):
    sock.sendall(line + b"\n")
print(reply["sid"], wire.wait_exit(lines))
"""


@pytest.mark.bpf
def test_garbage_from_a_wrapper_changes_nothing(enforcer):
    node = enforcer()
    result = subprocess.run([sys.executable, "-c", UPDATE_HELPER, str(node.data_dir / "enforcer.sock"), str(ROOT)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    sid, code = result.stdout.split()
    assert code == "7"
    wait_for(lambda: f"session {sid} ended" in node.log(), what="the session to end")
    assert "Traceback" not in node.log() and "relay error" not in node.log(), node.log()[-6000:]
