"""Fuzzing resource parsing and validation (issue 7): random and near-valid input to
every pure parser either works or fails with the module's own error type and a
message naming the problem; nothing else escapes, nothing hangs."""

from __future__ import annotations

import base64
import datetime as dt
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence import locking
from ringfence.config import ConfigError, load_config, parse_config
from ringfence.contract import api, strict
from ringfence.contract import documents as contract_documents
from ringfence.contract import resources as r
from ringfence.durations import MAX_SECONDS, parse_duration
from services.enforcer import policy_core, ssh_identity
from services.locks import core as locks_core
from services.policy import cidrs
from services.policy import core as policy_core_service
from tests.support.fuzz import (
    LOCK,
    POLICY_TEMPLATES,
    cidr_like,
    documents,
    json_values,
    mutated,
    texts,
)

pytestmark = pytest.mark.timeout(60)

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def request_bytes(docs: list[Any], dry_run: bool = False) -> bytes:
    return msgspec.json.encode({"resources": docs, "dry_run": dry_run})


def assert_clear(message: str) -> None:
    assert message.strip(), "an error without a message"
    assert "Traceback" not in message


# --- the policy service core ---------------------------------------------------------------


def _policy_create(data: bytes) -> list[str]:
    docs, _dry = contract_documents.decode_create_request(data)
    checked = policy_core_service.check_documents(docs)
    refs = policy_core_service.referenced_roles(checked)
    changes = policy_core_service.plan_create(checked, set(), refs, "fuzz", 1 << 20)
    for change in changes:
        # What is stored decodes again, and the enforcer can use it.
        stored = r.decode(change.value)
        if isinstance(stored, r.NetworkRestrictions):
            policy_core.effective_entries([c.cidr for c in stored.spec.allow], [c.cidr for c in stored.spec.deny])
        if isinstance(stored, r.Role) and stored.spec.options.client_idle_timeout:
            parse_duration(stored.spec.options.client_idle_timeout)
        if isinstance(stored, r.ClusterNetworkingConfig) and stored.spec.client_idle_timeout:
            parse_duration(stored.spec.client_idle_timeout)
    return policy_core_service.create_messages(changes)


@FAST
@given(st.lists(mutated(POLICY_TEMPLATES) | json_values, min_size=1, max_size=4))
def test_policy_create_documents(docs):
    try:
        messages = _policy_create(request_bytes(docs))
    except api.ApiError as exc:
        assert_clear(str(exc))
        assert exc.kind == "invalid"
        # Every problem line names the document it is about.
        for line in str(exc).splitlines():
            assert line.startswith("document ") or line.startswith("... and "), line
    else:
        assert len(messages) >= len(docs)


@FAST
@given(st.binary(max_size=300) | st.builds(lambda v: msgspec.json.encode(v), json_values))
def test_policy_create_request_bytes(data):
    try:
        _policy_create(data)
    except api.ApiError as exc:
        assert_clear(str(exc))


@settings(max_examples=30, deadline=5000)
@given(st.sampled_from(["[", "{\"a\":"]), st.integers(1000, 200_000))
def test_policy_create_deeply_nested(opener, depth):
    closer = "]" if opener == "[" else "}"
    doc = (opener * depth + "1" + closer * depth).encode()
    with pytest.raises(api.ApiError) as info:
        _policy_create(b'{"resources":[' + doc + b"]}")
    message = str(info.value)
    assert "nested too deeply" in message or message.startswith("document 1: (document): "), message


def test_policy_create_bad_utf8_and_out_of_range_numbers():
    for raw in (b'"\xff"', b'{"kind":"role","metadata":{"name":"\xed\xa0\x80"}}', b"1e999",
                b'{"kind":"role","version":"v5","metadata":{"name":"a","labels":{"x":-1e999}}}'):
        with pytest.raises(api.ApiError) as info:
            _policy_create(b'{"resources":[' + raw + b"]}")
        assert_clear(str(info.value))


@FAST
@given(texts, texts)
def test_policy_get_and_delete_targets(kind, name):
    try:
        look = policy_core_service.lookup(kind, name)
        policy_core_service.plan_delete(look, exists=True, actor="")
        policy_core_service.get_result(look, [])
    except api.ApiError as exc:
        assert_clear(str(exc))


@FAST
@given(st.lists(cidr_like(), max_size=6), st.lists(cidr_like(), max_size=6))
def test_network_restrictions_cidrs(allow, deny):
    doc = {"kind": "network_restrictions", "version": "v4",
           "spec": {"allow": [{"cidr": c} for c in allow], "deny": [{"cidr": c} for c in deny]}}
    try:
        [checked] = policy_core_service.check_documents([doc])
    except api.ApiError as exc:
        for line in str(exc).splitlines():
            assert "is not a valid CIDR" in line and ".cidr: " in line, line
        return
    stored = checked.resource
    policy_core.effective_entries([c.cidr for c in stored.spec.allow], [c.cidr for c in stored.spec.deny])


@settings(max_examples=500, deadline=1000)
@given(cidr_like())
def test_what_the_policy_validator_accepts_the_enforcer_reads_the_same(text):
    """services/enforcer/policy_core.parse_cidr reads what the policy service stored
    (and what it was given) as the same network the validator saw."""
    try:
        network = cidrs.parse_cidr(text)
    except ValueError:
        return
    stored = cidrs.normalise_cidr(text)
    assert policy_core.parse_cidr(stored) == network
    assert policy_core.parse_cidr(text) == network


# --- the locks service core --------------------------------------------------------------------


def _locks_create(data: bytes) -> list[str]:
    docs, _dry = contract_documents.decode_create_request(data)
    checked = locks_core.check_documents(docs)
    changes = locks_core.plan_create(checked, set(), "fuzz", NOW)
    for change in changes:
        stored = r.decode(change.value)
        assert isinstance(stored, r.Lock)
        locking.in_force(stored, NOW)
    return locks_core.create_messages(changes)


@FAST
@given(st.lists(mutated([LOCK, *POLICY_TEMPLATES]) | json_values, min_size=1, max_size=4))
def test_locks_create_documents(docs):
    try:
        _locks_create(request_bytes(docs))
    except api.ApiError as exc:
        assert_clear(str(exc))
        for line in str(exc).splitlines():
            assert line.startswith("document ") or line.startswith("... and "), line


@FAST
@given(st.binary(max_size=300) | st.builds(lambda v: msgspec.json.encode(v), json_values))
def test_locks_request_bytes_on_every_verb(data):
    for attempt in (
        lambda: _locks_create(data),
        lambda: locks_core.plan_lock(contract_documents.decode_request(data, api.LockRequest), "n", "", NOW),
        lambda: locks_core.check_kind(contract_documents.decode_request(data, api.GetRequest).kind),
        lambda: contract_documents.decode_request(data, api.UnlockRequest),
    ):
        try:
            attempt()
        except api.ApiError as exc:
            assert_clear(str(exc))


lock_targets = st.fixed_dictionaries({}, optional={f: texts for f in r.LOCK_TARGET_FIELDS})


@FAST
@given(lock_targets, texts, texts, texts)
def test_lock_requests(target, message, ttl, expires):
    request = api.LockRequest(target=r.LockTarget(**target), message=message, ttl=ttl, expires=expires)
    try:
        change = locks_core.plan_lock(request, "00000000-0000-0000-0000-000000000000", "", NOW)
    except api.ApiError as exc:
        assert_clear(str(exc))
        return
    lock = r.decode(change.value)
    assert locking.in_force(lock, NOW)


@FAST
@given(texts, texts)
def test_lock_delete_and_get_names(kind, name):
    try:
        locks_core.check_kind(kind)
        locks_core.plan_delete(name, None, "")
    except api.ApiError as exc:
        assert_clear(str(exc))
    try:
        locks_core.get_one(name, None, NOW)
    except api.ApiError as exc:
        assert exc.kind == "not_found"


@FAST
@given(texts)
def test_rfc3339_times(text):
    try:
        when = locking.parse_time(text)
    except ValueError as exc:
        assert_clear(str(exc))
    else:
        assert when.tzinfo is not None
        locking.format_time(when)


# --- contract/strict.py -------------------------------------------------------------------------

STRICT_TYPES = [r.AnyResource, api.CreateRequest, api.LockRequest, api.SearchRequest, api.OpenSessionRequest,
                api.GetRequest]


@FAST
@given(documents, st.sampled_from(STRICT_TYPES))
def test_strict_convert(doc, type_):
    try:
        strict.convert(doc, type_)
    except strict.DecodeError as exc:
        assert_clear(str(exc))


@FAST
@given(st.binary(max_size=300) | st.builds(lambda v: msgspec.json.encode(v), documents),
       st.sampled_from(STRICT_TYPES))
def test_strict_decode_json(data, type_):
    try:
        strict.decode_json(data, type_)
    except strict.DecodeError as exc:
        assert_clear(str(exc))


def test_strict_decode_json_edge_cases():
    cases = [b"", b"\xff", b'"\xff"', b'{"user":"\xed\xa0\x80"}', b"[" * 100_000, b"1e999",
             b'{"limit": 1e999}', b"x" * (strict.MAX_DOCUMENT_BYTES + 1)]
    for data in cases:
        with pytest.raises(strict.DecodeError) as info:
            strict.decode_json(data, api.SearchRequest)
        assert_clear(str(info.value))


# --- config and durations -------------------------------------------------------------------------

config_docs = st.fixed_dictionaries(
    {},
    optional={
        "cluster_name": json_values, "nodename": texts | json_values, "data_dir": texts,
        "nats_url": texts, "lock_view_max_staleness": texts | json_values,
        "ssh_service": st.fixed_dictionaries({}, optional={
            "enabled": json_values,
            "enhanced_recording": st.fixed_dictionaries({}, optional={
                "enabled": st.booleans() | json_values, "cgroup_path": texts,
                "ring_buffer_kib": st.integers() | json_values}),
            "restricted_session": json_values,
        }),
        "unknown": json_values,
    },
)


def _yaml_text(doc: Any) -> str:
    try:
        return yaml.safe_dump(doc)
    except yaml.YAMLError:
        return "{}"


@FAST
@given(st.text(max_size=200) | st.builds(_yaml_text, config_docs) | st.builds(_yaml_text, json_values))
def test_parse_config(text):
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml: ")


@settings(max_examples=60, deadline=3000)
@given(st.builds(_yaml_text, config_docs))
def test_load_config_validates_every_value(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ringfence.yaml"
        path.write_text(text)
        try:
            cfg = load_config(str(path))
        except ConfigError as exc:
            assert str(exc).startswith(str(path))
        else:
            assert cfg.nats_urls and Path(cfg.data_dir).is_absolute()
            parse_duration(cfg.lock_view_max_staleness)


def test_parse_config_deep_nesting_and_aliases():
    for text in ("a: " + "[" * 5000 + "]" * 5000, "{a: " * 2000 + "1" + "}" * 2000, "a: &x [*x]",
                 "\x00\x01", "- &a [x]\n- *b"):
        with pytest.raises(ConfigError) as info:
            parse_config(text, "deep.yaml")
        assert str(info.value).startswith("deep.yaml: ")


@settings(max_examples=400, deadline=1000)
@given(texts | st.from_regex(r"[0-9.]{0,8}(ns|us|µs|ms|s|m|h|d){0,2}([0-9.]{0,8}(ns|us|ms|s|m|h|d)?){0,3}",
                             fullmatch=True))
def test_parse_duration(text):
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        assert strict.show(text) in str(exc)
    else:
        assert 0 <= seconds <= MAX_SECONDS


# --- SSH identity ------------------------------------------------------------------------------------


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@st.composite
def certificate_blobs(draw) -> tuple[str, str]:
    """A certificate-shaped blob: the right type name, then random or truncated fields."""
    key_type = draw(st.sampled_from(list(ssh_identity._CERT_KEY_FIELDS)))
    fields = [_ssh_string(draw(st.sampled_from([key_type.encode(), b"ssh-rsa", b""])))]
    fields += [_ssh_string(draw(st.binary(max_size=40))) for _ in range(draw(st.integers(0, 6)))]
    fields.append(draw(st.binary(max_size=8)))  # serial
    fields.append(struct.pack(">I", draw(st.sampled_from([1, 2, 0xFFFFFFFF]))))
    key_id = draw(st.binary(max_size=40))
    length = draw(st.sampled_from([len(key_id), len(key_id) + 1, 0xFFFFFFFF]))
    fields.append(struct.pack(">I", length) + key_id)
    blob = b"".join(fields)
    blob = blob[: draw(st.integers(0, len(blob)))] if draw(st.booleans()) else blob
    return key_type, base64.b64encode(blob).decode()


@settings(max_examples=300, deadline=1000)
@given(certificate_blobs() | st.tuples(st.sampled_from(list(ssh_identity._CERT_KEY_FIELDS)) | texts,
                                       st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()) | texts))
def test_certificate_key_id_with_random_bytes(key):
    key_type, blob = key
    result = ssh_identity.certificate_key_id(ssh_identity.AuthKey(key_type, blob))
    assert result is None or isinstance(result, str)


@FAST
@given(st.text(max_size=300) | st.lists(st.tuples(st.sampled_from(["publickey", "password", ""]), texts, texts))
       .map(lambda rows: "\n".join(" ".join(row) for row in rows)), texts)
def test_parse_auth_info_and_resolve(text, login):
    keys = ssh_identity.parse_auth_info(text)
    assert all(k.key_type and k.blob for k in keys)
    identity = ssh_identity.resolve(text, login, {})
    assert isinstance(identity.user, str)
