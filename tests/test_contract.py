"""The wire contract: codes, names, strict decoding."""

from __future__ import annotations

import re
from collections import Counter

import msgspec
import pytest

from ringfence.contract import events, names, resources, strict


def test_every_event_type_has_exactly_one_code_and_no_code_is_shared():
    codes = {t: cls.CODE for t, cls in events.EVENT_TYPES.items()}
    assert all(codes.values()), [t for t, c in codes.items() if not c]
    dupes = [c for c, n in Counter(codes.values()).items() if n > 1]
    assert not dupes, f"codes used by more than one event type: {dupes}"
    for t, code in codes.items():
        assert re.fullmatch(r"[A-Z]+[0-9A-Z]*[0-9]+[IWE]", code), (t, code)


@pytest.mark.parametrize(
    ("event", "code"),
    [
        ("session.command", "T4000I"),
        ("session.disk", "T4001I"),
        ("session.network", "T4002I"),
        ("session.start", "T2000I"),
        ("session.join", "T2001I"),
        ("session.leave", "T2003I"),
        ("session.end", "T2004I"),
        ("session.rejected", "T1006W"),
        ("exec", "T3002I"),
        ("client.disconnect", "T3006I"),
        ("lock.created", "TLK00I"),
        ("lock.deleted", "TLK01I"),
        ("role.created", "T9000I"),
        ("role.deleted", "T9001I"),
    ],
)
def test_reference_codes_are_kept(event, code):
    assert code == events.EVENT_TYPES[event].CODE


def test_event_json_has_the_seed_fields_and_round_trips():
    ev = events.SessionNetwork(user="demo", login="demo", sid="s1", dst_addr="10.0.0.1", dst_port=80, pid=7)
    doc = msgspec.json.decode(events.encode_event(ev))
    for key in ("ei", "event", "uid", "code", "time", "cluster_name", "user", "login", "sid", "namespace",
                "server_id", "pid", "cgroup_id", "program", "src_addr", "dst_addr", "dst_port", "version",
                "operation", "action"):
        assert key in doc, key
    assert doc["event"] == "session.network" and doc["code"] == "T4002I"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert events.decode_event(events.encode_event(ev)) == ev


def test_session_start_uses_dotted_address_keys():
    doc = msgspec.json.decode(events.encode_event(events.SessionStart(addr_remote="127.0.0.1:5000")))
    assert doc["addr.remote"] == "127.0.0.1:5000" and "addr_remote" not in doc


def test_kv_keys_round_trip_any_user_name():
    for name in ["alice", "foo@example.com", "ünïcode user", "a/b.c"]:
        key = names.user_key(name)
        assert re.fullmatch(r"[-/_=.a-zA-Z0-9]+", key), key
        assert names.decode_key_part(key.removeprefix(names.USER_KEY_PREFIX)) == name


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"kind": "network_restrictions", "version": "v4", "spec": {"allow": [{"cidr": "10.0.0.0/8", "port": 1}]}},
         "spec.allow[0].port: unknown field"),
        ({"kind": "network_restrictions", "version": "v3"}, 'version: "v3": invalid enum value'),
        ({"kind": "nope", "version": "v1"}, 'kind: "nope": invalid value'),
        ({"kind": "role", "version": "v5", "metadata": {"name": "r"}, "spec": {"options": {"max_sessions": "3"}}},
         'spec.options.max_sessions: "3": expected `int`, got `str`'),
        ({"kind": "lock", "version": "v2", "metadata": {"name": "x"}, "spec": {"target": {"usr": "a"}}},
         "spec.target.usr: unknown field"),
    ],
)
def test_strict_decoding_names_the_key_and_the_value(doc, message):
    with pytest.raises(strict.DecodeError) as info:
        strict.convert(doc, resources.AnyResource)
    assert message in str(info.value)


def test_lock_target_describes_itself_as_the_original_prints_it():
    assert resources.LockTarget(user="foo@example.com").describe() == 'User:"foo@example.com"'
