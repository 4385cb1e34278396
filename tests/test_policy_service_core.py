"""The policy service's pure core: checks, plans, messages, events."""

from __future__ import annotations

import base64
import copy
import struct

import msgspec
import nkeys
import pytest

from ringfence.contract import api, documents, events, names
from ringfence.contract import resources as r
from services.policy import core
from services.policy.credentials import is_openssh_public_key, is_public_user_nkey

BIG = 1 << 20


def ssh_key(kind: str = "ssh-ed25519", comment: str = "alice@laptop") -> str:
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", 32) + bytes(range(32))
    return f"{kind} {base64.b64encode(blob).decode()} {comment}".strip()


def user_nkey() -> str:
    seed = nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER)
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


NETPOL = {
    "kind": "network_restrictions",
    "version": "v4",
    "metadata": {"name": "network-restrictions"},
    "spec": {"allow": [{"cidr": "10.0.0.0/8"}, {"cidr": "fe80::/10"}], "deny": [{"cidr": "10.1.2.3"}]},
}
ROLE = {
    "kind": "role",
    "version": "v5",
    "metadata": {"name": "locksmith"},
    "spec": {
        "allow": {"rules": [{"resources": ["lock"], "verbs": ["list", "create", "read", "update", "delete"]}],
                  "logins": ["ubuntu"]},
        "options": {"lock": "strict", "max_connections": 2, "max_sessions": 3, "client_idle_timeout": "15m"},
    },
}
USER = {"kind": "user", "version": "v2", "metadata": {"name": "alice@example.com"},
        "spec": {"roles": ["locksmith"], "ssh_public_keys": [ssh_key()], "operator_nkey": user_nkey()}}
CAP = {"kind": "cluster_auth_preference", "version": "v2", "metadata": {"name": "cluster-auth-preference"},
       "spec": {"locking_mode": "strict"}}
NETWORKING = {"kind": "cluster_networking_config", "version": "v2", "spec": {"client_idle_timeout": "15m"}}


def with_(doc: dict, path: str, value) -> dict:
    """A copy of `doc` with the dotted `path` set (list indexes as numbers)."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    cur = out
    for step in parents:
        cur = cur[int(step)] if step.isdigit() else cur.setdefault(step, {})
    cur[int(last) if last.isdigit() else last] = value
    return out


def rejection(docs: list) -> str:
    with pytest.raises(api.ApiError) as info:
        core.check_documents(docs)
    assert info.value.kind == "invalid"
    return str(info.value)


# --- accepted documents ---------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        NETPOL,
        {"kind": "network_restrictions", "version": "v4"},  # name defaults; empty lists: deny all
        ROLE,
        {"kind": "role", "metadata": {"name": "minimal"}},
        with_(ROLE, "spec.allow.rules", [{"resources": ["*"], "verbs": ["*"]}]),
        USER,
        {"kind": "user", "metadata": {"name": "bob"}, "spec": {"ssh_public_keys": [ssh_key("ssh-rsa", "")]}},
        CAP,
        {"kind": "cluster_auth_preference"},
        NETWORKING,
        with_(NETWORKING, "spec.client_idle_timeout", "0s"),
    ],
)
def test_good_documents_pass(doc):
    [checked] = core.check_documents([doc])
    assert checked.resource.__struct_config__.tag == doc["kind"]


def test_cidrs_are_stored_normalised():
    doc = with_(NETPOL, "spec.allow", [{"cidr": "10.0.0.1/8"}, {"cidr": "::ffff:10.0.0.0/104"}, {"cidr": "::1"}])
    [checked] = core.check_documents([doc])
    assert [c.cidr for c in checked.resource.spec.allow] == ["10.0.0.0/8", "10.0.0.0/8", "::1/128"]
    assert [c.cidr for c in checked.resource.spec.deny] == ["10.1.2.3/32"]


# --- rejected documents: the message names the document, the key and the value ----------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (with_(NETPOL, "spec.allow", [{"cidr": c} for c in ["1.1.1.1", "2.2.2.2", "3.3.3.3", "10.0.0.0/33"]]),
         'document 1 (network_restrictions "network-restrictions"): '
         'spec.allow[3].cidr: "10.0.0.0/33" is not a valid CIDR'),
        (with_(NETPOL, "spec.deny.0.cidr", "300.1.1.1"), 'spec.deny[0].cidr: "300.1.1.1" is not a valid CIDR'),
        (with_(NETPOL, "spec.deny.0.cidr", ""), 'spec.deny[0].cidr: "" is not a valid CIDR'),
        (with_(NETPOL, "spec.allow.1.cidr", "fe80::/129"), 'spec.allow[1].cidr: "fe80::/129" is not a valid CIDR'),
        (with_(NETPOL, "spec.allow.0.cidr", 10), "spec.allow[0].cidr: 10: expected `str`, got `int`"),
        (with_(NETPOL, "spec.allow.0.port", 22), "spec.allow[0].port: unknown field"),
        (with_(NETPOL, "spec.allowed", []), "spec.allowed: unknown field"),
        (with_(NETPOL, "metadata.name", "mine"), 'metadata.name: "mine": must be "network-restrictions"'),
        (with_(NETPOL, "version", "v3"), 'version: "v3": invalid enum value'),
        (with_(ROLE, "metadata.name", "two words"), 'metadata.name: "two words" is not a valid name'),
        (with_(ROLE, "metadata.name", ""), 'metadata.name: "" is not a valid name'),
        (with_(ROLE, "metadata.name", "a/b"), 'metadata.name: "a/b" is not a valid name'),
        (with_(ROLE, "metadata.name", "x" * 254), "is not a valid name"),
        (with_(ROLE, "spec.options.lock", "loose"), 'spec.options.lock: "loose"'),
        (with_(ROLE, "spec.options.max_connections", -1), "spec.options.max_connections: -1: must be 0 (no limit)"),
        (with_(ROLE, "spec.options.max_sessions", -5), "spec.options.max_sessions: -5: must be 0"),
        (with_(ROLE, "spec.options.max_sessions", "3"), 'spec.options.max_sessions: "3": expected `int`'),
        (with_(ROLE, "spec.options.client_idle_timeout", "15x"),
         'spec.options.client_idle_timeout: "15x" is not a duration'),
        (with_(ROLE, "spec.allow.rules.0.verbs", ["list", "write"]),
         'spec.allow.rules[0].verbs[1]: "write" is not a verb'),
        (with_(ROLE, "spec.allow.rules.0.verbs", []), "spec.allow.rules[0].verbs: must name at least one verb"),
        (with_(ROLE, "spec.allow.rules.0.resources", []),
         "spec.allow.rules[0].resources: must name at least one resource"),
        (with_(ROLE, "spec.deny.rules", [{"resources": [""], "verbs": ["read"]}]),
         'spec.deny.rules[0].resources[0]: "" is not a resource name'),
        (with_(USER, "spec.ssh_public_keys", ["ssh-ed25519 AAAA"]),
         'spec.ssh_public_keys[0]: "ssh-ed25519 AAAA" is not an OpenSSH public key'),
        (with_(USER, "spec.operator_nkey", "UABC"), 'spec.operator_nkey: "UABC" is not a public user nkey'),
        (with_(USER, "spec.roles", ["ok", "bad role"]), 'spec.roles[1]: "bad role" is not a valid name'),
        (with_(CAP, "spec.locking_mode", "lenient"), 'spec.locking_mode: "lenient": invalid enum value'),
        (with_(CAP, "metadata.name", "x"), 'metadata.name: "x": must be "cluster-auth-preference"'),
        (with_(NETWORKING, "spec.client_idle_timeout", "soon"), 'spec.client_idle_timeout: "soon" is not a duration'),
        ({"kind": "nope"}, 'document 1 (nope): kind: "nope": invalid value'),
        ({"version": "v4"}, "document 1: "),
        ({"kind": "lock", "version": "v2", "metadata": {"name": "l"}, "spec": {"target": {"user": "a"}}},
         'kind "lock" is served by the locks service'),
    ],
)
def test_bad_documents_are_rejected_naming_key_and_value(doc, message):
    assert message in rejection([doc])


def test_list_limit_names_the_list_and_the_count(monkeypatch):
    monkeypatch.setattr(r, "MAX_CIDRS_PER_LIST", 3)
    doc = with_(NETPOL, "spec.deny", [{"cidr": f"10.0.0.{i}"} for i in range(4)])
    assert "spec.deny: 4 entries; at most 3 are allowed" in rejection([doc])


def test_one_bad_document_rejects_the_request_and_every_problem_is_listed():
    bad_role = with_(with_(ROLE, "metadata.name", "x"), "spec.options.max_sessions", -1)
    bad_net = with_(NETPOL, "spec.allow.0.cidr", "10.0.0.0/33")
    text = rejection([ROLE, bad_role, USER, bad_net])
    lines = text.splitlines()
    assert lines[0].startswith('document 2 (role "x"): spec.options.max_sessions: -1')
    assert lines[1].startswith('document 4 (network_restrictions "network-restrictions"): spec.allow[0].cidr')
    assert len(lines) == 2


def test_the_same_resource_twice_in_one_request_is_rejected():
    text = rejection([NETPOL, with_(NETPOL, "spec.deny", [])])
    assert "document 2 (network_restrictions" in text and "already contains this resource (document 1)" in text


def test_a_long_list_of_problems_is_cut():
    doc = with_(NETPOL, "spec.allow", [{"cidr": "bad"}] * (documents.MAX_PROBLEMS_SHOWN + 10))
    lines = rejection([doc]).splitlines()
    assert len(lines) == documents.MAX_PROBLEMS_SHOWN + 1
    assert lines[-1] == "... and 10 more problems"


# --- requests -----------------------------------------------------------------------------


def test_requests_over_the_size_limit_are_refused_before_decoding():
    with pytest.raises(api.ApiError, match=r"at most 16777216 \(16 MiB\)"):
        documents.decode_create_request(b" " * (documents.MAX_REQUEST_BYTES + 1))


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"{}", "malformed create request"), (b"not json", "malformed create request"),
     (b'{"resources": []}', "no documents")],
)
def test_malformed_requests_are_refused(data, message):
    with pytest.raises(api.ApiError, match=message):
        documents.decode_create_request(data)


def test_a_create_request_round_trips_its_documents():
    raw = msgspec.json.encode(api.CreateRequest(resources=[msgspec.Raw(msgspec.json.encode(ROLE))], dry_run=True))
    docs, dry_run = documents.decode_create_request(raw)
    assert docs == [ROLE] and dry_run is True


# --- plans: messages, events, keys -------------------------------------------------------------


def plan(docs, existing_keys=(), existing_roles=(), max_value=BIG):
    return core.plan_create(core.check_documents(docs), set(existing_keys), set(existing_roles), "ops", max_value)


@pytest.mark.parametrize(
    ("doc", "existed", "key", "message", "event_type"),
    [
        (NETPOL, False, names.NETWORK_RESTRICTIONS_KEY, "network restrictions have been updated",
         "network_restrictions.update"),
        (ROLE, False, names.role_key("locksmith"), "role 'locksmith' has been created", "role.created"),
        (ROLE, True, names.role_key("locksmith"), "role 'locksmith' has been updated", "role.created"),
        (USER, False, names.user_key("alice@example.com"), 'user "alice@example.com" has been created',
         "user.create"),
        (USER, True, names.user_key("alice@example.com"), 'user "alice@example.com" has been updated',
         "user.create"),
        (CAP, False, names.CAP_KEY, "cluster auth preference has been updated", "cluster_auth_preference.update"),
        (NETWORKING, False, names.NETWORKING_KEY, "cluster networking configuration has been updated",
         "cluster_networking_config.update"),
    ],
)
def test_create_plans_the_message_event_and_key(doc, existed, key, message, event_type):
    [change] = plan([doc], existing_keys=[key] if existed else [], existing_roles=["locksmith"])
    assert change.key == key and change.message == message
    assert change.event.event_type() == event_type and change.event.user == "ops"
    assert r.decode(change.value) == core.check_documents([doc])[0].resource


def test_network_restrictions_event_counts_the_lists():
    [change] = plan([NETPOL])
    assert isinstance(change.event, events.NetworkRestrictionsUpdated)
    assert (change.event.allow, change.event.deny) == (2, 1)


def test_users_may_name_missing_roles_with_a_warning():
    changes = plan([with_(USER, "spec.roles", ["locksmith", "auditor", "dev"])], existing_roles=["locksmith"])
    assert core.create_messages(changes) == [
        'user "alice@example.com" has been created',
        'warning: user "alice@example.com" refers to role "auditor", which does not exist yet',
        'warning: user "alice@example.com" refers to role "dev", which does not exist yet',
    ]


def test_roles_created_in_the_same_request_count_as_existing():
    docs = core.check_documents([USER, ROLE])
    assert core.referenced_roles(docs) == set()
    changes = core.plan_create(docs, set(), set(), "", BIG)
    assert not any(c.warnings for c in changes)


def test_a_value_too_large_for_nats_is_refused_before_anything_is_written():
    with pytest.raises(api.ApiError, match=r"document 1 \(network_restrictions .*max_payload"):
        plan([NETPOL], max_value=50)


# --- get and delete ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("network_restrictions", "", core.Lookup("network_restrictions", "network-restrictions",
                                                 key=names.NETWORK_RESTRICTIONS_KEY)),
        ("net_restrict", "", core.Lookup("network_restrictions", "network-restrictions",
                                         key=names.NETWORK_RESTRICTIONS_KEY)),
        ("cap", "", core.Lookup("cluster_auth_preference", "cluster-auth-preference", key=names.CAP_KEY)),
        ("roles", "", core.Lookup("role", "", prefix=names.ROLE_KEY_PREFIX)),
        ("role", "x", core.Lookup("role", "x", key=names.role_key("x"))),
        ("users", "a@b", core.Lookup("user", "a@b", key=names.user_key("a@b"))),
    ],
)
def test_lookup_resolves_aliases_to_keys(kind, name, expected):
    assert core.lookup(kind, name) == expected


@pytest.mark.parametrize(
    ("kind", "name", "message", "error_kind"),
    [
        ("widgets", "", 'unknown kind "widgets"', "invalid"),
        ("locks", "", "locks service", "invalid"),
        ("cap", "other", 'cluster_auth_preference "other" not found', "not_found"),
    ],
)
def test_lookup_refuses_what_it_cannot_serve(kind, name, message, error_kind):
    with pytest.raises(api.ApiError, match=message) as info:
        core.lookup(kind, name)
    assert info.value.kind == error_kind


def test_get_shows_defaults_for_unset_settings_and_nothing_for_unset_restrictions():
    [cap] = core.get_result(core.lookup("cap", ""), [])
    assert r.decode(bytes(cap)) == r.ClusterAuthPreference()
    assert core.get_result(core.lookup("network_restrictions", ""), []) == []
    assert core.get_result(core.lookup("roles", ""), []) == []
    with pytest.raises(api.ApiError, match='role "x" not found') as info:
        core.get_result(core.lookup("role", "x"), [])
    assert info.value.kind == "not_found"


@pytest.mark.parametrize(
    ("kind", "name", "exists", "message", "event_type"),
    [
        ("network_restrictions", "", True, "network restrictions have been reset to defaults (allow all)",
         "network_restrictions.reset"),
        ("network_restrictions", "", False, "network restrictions have been reset to defaults (allow all)",
         "network_restrictions.reset"),
        ("role", "x", True, 'role "x" has been deleted', "role.deleted"),
        ("user", "alice", True, 'user "alice" has been deleted', "user.delete"),
        ("cap", "", False, "cluster auth preference has been reset to defaults", "cluster_auth_preference.update"),
        ("networking", "", True, "cluster networking configuration has been reset to defaults",
         "cluster_networking_config.update"),
    ],
)
def test_delete_plans_the_message_and_event(kind, name, exists, message, event_type):
    change = core.plan_delete(core.lookup(kind, name), exists, "ops")
    assert change.value is None and change.message == message
    assert change.event.event_type() == event_type and change.event.user == "ops"


@pytest.mark.parametrize(("kind", "message"), [("role", 'role "x" not found'), ("user", 'user "x" not found')])
def test_deleting_an_absent_role_or_user_is_not_found(kind, message):
    with pytest.raises(api.ApiError, match=message) as info:
        core.plan_delete(core.lookup(kind, "x"), False, "")
    assert info.value.kind == "not_found"


def test_deleting_needs_a_name_for_roles():
    with pytest.raises(api.ApiError, match="ringfence rm role/NAME"):
        core.plan_delete(core.lookup("roles", ""), False, "")


# --- credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (ssh_key(), True),
        (ssh_key("ecdsa-sha2-nistp256"), True),
        (ssh_key(comment=""), True),
        (ssh_key().replace("ssh-ed25519 ", "ssh-rsa ", 1), False),  # type and blob disagree
        ("ssh-ed25519", False),
        ("ssh-ed25519 !!!not-base64", False),
        ("ssh-foo AAAAB3NzaC1yc2E=", False),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", False),
        (ssh_key() + "\nssh-ed25519 AAAA", False),
    ],
)
def test_openssh_public_key_shape(text, ok):
    assert is_openssh_public_key(text) is ok


def test_user_nkey_shape():
    good = user_nkey()
    assert is_public_user_nkey(good)
    assert not is_public_user_nkey("A" + good[1:])  # account key, not a user
    assert not is_public_user_nkey(good[:-1] + ("A" if good[-1] != "A" else "B"))  # checksum
    assert not is_public_user_nkey("U" * 10)


# --- settings from the config file ---------------------------------------------------------------------


def auth_service(locking_mode="", session_recording="", client_idle_timeout=""):
    from ringfence.config import Authentication, AuthService
    return AuthService(Authentication(locking_mode), session_recording, client_idle_timeout)


def test_the_config_file_writes_what_it_sets_marked_as_its_own():
    desired = core.static_resources(auth_service("strict", "node-sync", "15m"))
    changes = core.plan_static(desired, {})
    assert [(c.key, c.message) for c in changes] == [
        (names.CAP_KEY, "cluster auth preference has been updated (from the config file)"),
        (names.NETWORKING_KEY, "cluster networking configuration has been updated (from the config file)"),
        (names.RECORDING_CONFIG_KEY, "session recording configuration has been updated (from the config file)")]
    cap = r.decode(changes[0].value)
    assert cap.spec.locking_mode == "strict" and cap.metadata.labels == {r.ORIGIN_LABEL: r.ORIGIN_CONFIG_FILE}
    assert r.decode(changes[2].value).spec.mode == "node-sync"
    # Started again with the same file: nothing to write.
    assert core.plan_static(desired, {c.key: c.value for c in changes}) == []


def test_a_setting_the_file_no_longer_has_goes_back_to_defaults_and_a_dynamic_one_stays():
    written = {c.key: c.value for c in core.plan_static(core.static_resources(auth_service("strict")), {})}
    dynamic = r.encode(r.ClusterNetworkingConfig(spec=r.ClusterNetworkingConfigSpec(client_idle_timeout="5m")))
    changes = core.plan_static(core.static_resources(auth_service()), {**written, names.NETWORKING_KEY: dynamic})
    assert [(c.key, c.value, c.message) for c in changes] == [
        (names.CAP_KEY, None, "cluster auth preference has been reset to defaults (no longer in the config file)")]


def test_create_and_rm_leave_a_setting_of_the_config_file_alone():
    static = {names.CAP_KEY}
    message = ("cluster_auth_preference is set by the policy service's config file "
               "(auth_service.authentication.locking_mode): change it there and restart the policy service, or "
               "remove it there to manage it with ringfence create -f")
    with pytest.raises(api.ApiError, match=r"set by the policy service's config file") as info:
        core.plan_create(core.check_documents([CAP]), set(), set(), "admin", BIG, static)
    assert str(info.value) == message and info.value.kind == "conflict"
    with pytest.raises(api.ApiError) as info:
        core.plan_delete(core.lookup("cap", ""), True, "admin", static=True)
    assert str(info.value) == message
    labelled = with_(CAP, "metadata.labels", {r.ORIGIN_LABEL: r.ORIGIN_CONFIG_FILE})
    assert "metadata.labels.ringfence.dev/origin: is set by the policy service only" in rejection([labelled])
