"""ringfence/migrate.py: the original's exported documents as Ringfence's, nothing dropped silently."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ringfence import migrate
from ringfence.contract import resources as r
from ringfence.contract import strict

EXPORT = Path(__file__).parents[1] / "examples" / "migration" / "tctl-get-all.yaml"
KEY = "SHA256:mXu4uS8Valt9tkpP1RLL+mNxjogzy99UT3rBT6tOykE"


def one(doc: dict) -> tuple[dict | None, list[str], dict[str, list[str]]]:
    t = migrate.translate([(1, doc)])
    return (t.docs[0][1] if t.docs else None), t.notes, t.skipped


def role(spec: dict, version: str = "v7") -> dict:
    return {"kind": "role", "version": version, "metadata": {"name": "r", "id": 17}, "spec": spec}


def test_the_whole_export_translates_into_documents_ringfence_decodes():
    docs = list(yaml.safe_load_all(EXPORT.read_text()))
    t = migrate.translate(list(enumerate(docs, 1)))
    for _, doc in t.docs:
        strict.convert(doc, r.AnyResource)  # raises on any field Ringfence does not have
    kinds = [doc["kind"] for _, doc in t.docs]
    assert kinds.count("role") == 4 and kinds.count("user") == 3 and kinds.count("lock") == 2
    assert sum(map(len, t.skipped.values())) + len(t.docs) == len(docs)  # every document accounted for


@pytest.mark.parametrize("spec, expected, note", [
    ({"options": {"max_connections": 2, "max_sessions": 3, "client_idle_timeout": "15m0s", "lock": "strict",
                  "max_session_ttl": "8h0m0s", "forward_agent": False}},
     {"options": {"max_connections": 2, "max_sessions": 3, "client_idle_timeout": "15m0s", "lock": "strict"}},
     "spec.options.max_session_ttl"),  # forward_agent false is a default: nothing to say
    ({"options": {"client_idle_timeout": "0s"}}, {"options": {}}, None),
    ({"allow": {"rules": [{"resources": ["lock", "token"], "verbs": ["list", "readnosecrets", "rotate"]}]}},
     {"allow": {"rules": [{"resources": ["lock"], "verbs": ["list", "read"]}]}},
     "spec.allow.rules[0] (token, verb rotate)"),
    # An allow rule with a condition would grant more without it: left out.
    ({"allow": {"rules": [{"resources": ["session"], "verbs": ["read"], "where": "x"}]}}, {"allow": {}},
     "spec.allow.rules[0] (has where)"),
    # A deny rule keeps denying without its condition: denies more.
    ({"deny": {"rules": [{"resources": ["session"], "verbs": ["read"], "where": "x"}]}},
     {"deny": {"rules": [{"resources": ["session"], "verbs": ["read"]}]}}, "spec.deny.rules[0].where"),
    ({"allow": {"logins": ["ubuntu", "{{internal.logins}}"], "node_labels": {"env": "prod"}}},
     {"allow": {"logins": ["ubuntu", "{{internal.logins}}"]}}, "spec.allow.node_labels"),
])
def test_roles_keep_what_ringfence_enforces_and_name_the_rest(spec, expected, note):
    doc, notes, _ = one(role(spec))
    assert doc is not None
    got = {k: v for k, v in doc["spec"].items() if v}
    assert got == {k: v for k, v in expected.items() if v}
    assert doc["metadata"] == {"name": "r"}  # the original's bookkeeping (id) is not data
    if note:
        assert len(notes) == 1 and note in notes[0] and notes[0].startswith('document 1 (role "r"): ')
    else:
        assert notes == []


def test_old_role_versions_become_v5_and_unknown_ones_are_skipped():
    assert one(role({}, "v4"))[0]["version"] == "v5"
    doc, _, skipped = one(role({}, "v9"))
    assert doc is None and list(skipped) == ["role: role version 'v9' (v3-v7 are imported)"]


@pytest.mark.parametrize("target, kept, skipped", [
    ({"user": "alice"}, {"user": "alice"}, False),
    ({"device": KEY}, {"device": KEY}, False),
    ({"device": "9cdfc0ad-64b7-4d9c-9342-50e97f418ba0", "user": "bob"}, {"user": "bob"}, False),
    ({"windows_desktop": "WIN-1"}, None, True),
    ({"access_request": "261e80c5", "mfa_device": "d6c06a18"}, None, True),
])
def test_locks_keep_the_targets_that_can_match(target, kept, skipped):
    doc, _, skips = one({"kind": "lock", "version": "v2", "metadata": {"name": "l1"},
                         "spec": {"target": target, "message": "m", "created_at": "2023-08-14T12:27:00Z",
                                  "created_by": "bob"}})
    assert bool(skips) is skipped
    if kept is not None:
        assert doc["spec"] == {"target": kept, "message": "m"}


@pytest.mark.parametrize("origin, imported", [("dynamic", True), (None, True), ("config-file", False),
                                              ("defaults", False)])
def test_cluster_settings_from_the_originals_config_or_defaults_are_not_imported(origin, imported):
    labels = {"teleport.dev/origin": origin} if origin else {}
    doc, _, skipped = one({"kind": "cluster_auth_preference", "version": "v2",
                           "metadata": {"name": "cluster-auth-preference", "labels": labels},
                           "spec": {"locking_mode": "strict", "type": "local"}})
    assert (doc is not None) is imported
    if imported:
        assert doc == {"kind": "cluster_auth_preference", "version": "v2",
                       "metadata": {"name": "cluster-auth-preference"}, "spec": {"locking_mode": "strict"}}
    else:
        assert "came from the original's" in next(iter(skipped))


def test_proxy_recording_modes_record_on_the_node():
    doc, notes, _ = one({"kind": "session_recording_config", "version": "v2",
                         "metadata": {"name": "session-recording-config"},
                         "spec": {"mode": "proxy-sync", "proxy_checks_host_keys": True}})
    assert doc["spec"] == {"mode": "node-sync"}
    assert "proxy_checks_host_keys" in notes[0] and '"proxy-sync"' in notes[0]


def test_existing_users_keep_their_keys_identity_and_roles():
    docs = [(4, {"kind": "user", "version": "v2", "metadata": {"name": "alice"}, "spec": {"roles": ["access"]}})]
    existing = {"alice": r.User(metadata=r.Metadata(name="alice"),
                                spec=r.UserSpec(roles=["admin", "access"], ssh_public_keys=["ssh-ed25519 AAAA a"],
                                                operator_nkey="UABC"))}
    notes = migrate.merge_existing_users(docs, existing)
    assert docs[0][1]["spec"] == {"roles": ["access", "admin"], "ssh_public_keys": ["ssh-ed25519 AAAA a"],
                                  "operator_nkey": "UABC"}
    assert notes == ['document 4 (user "alice"): kept its Ringfence roles admin, SSH keys, operator identity']
