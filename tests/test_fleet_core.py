"""Fleet decisions without I/O (services/policy/fleet_core.py): tokens, joins, what the callout grants."""

from __future__ import annotations

import uuid

import pytest

from ringfence.auth import new_user_seed, public_key_of
from ringfence.contract import fleet, names
from ringfence.contract.api import ApiError
from ringfence.runtime import nats_jwt
from services.policy import fleet_core as core

NOW = 1_800_000_000.0
SID = str(uuid.uuid4())
NKEY = public_key_of(new_user_seed())


def join(**kw) -> fleet.JoinRequest:
    return fleet.JoinRequest(**{"token": "t", "nodename": "web-1", "server_id": SID, "nkey": NKEY, **kw})


@pytest.mark.parametrize(("request_", "problem"), [
    (join(nodename="bad name"), 'nodename "bad name"'),
    (join(server_id="not-a-uuid"), 'server_id "not-a-uuid" is not a host UUID'),
    (join(server_id="a.b.>"), "is not a host UUID"),
    (join(nkey="UXYZ"), "nkey:"),
])
def test_a_join_with_a_bad_field_is_refused_naming_it(request_, problem):
    with pytest.raises(ApiError, match=problem):
        core.check_join(request_, [])


def test_a_name_a_server_id_or_a_key_joins_once():
    taken = fleet.NodeRecord(name="web-1", server_id=str(uuid.uuid4()), nkey=public_key_of(new_user_seed()),
                             joined="x")
    for request_, problem in ((join(), 'node "web-1" has already joined'),
                              (join(nodename="web-2", server_id=taken.server_id), "already belongs to node"),
                              (join(nodename="web-2", nkey=taken.nkey), "already belongs to node")):
        with pytest.raises(ApiError, match=problem):
            core.check_join(request_, [taken])


@pytest.mark.parametrize(("ttl", "ok"), [(0.5, False), (1, True), (3600, True), (fleet.MAX_TOKEN_TTL + 1, False)])
def test_token_lifetimes_are_bounded(ttl, ok):
    if ok:
        added, change = core.plan_token_add(fleet.TokenAddRequest(ttl=ttl), "alice", NOW)
        assert change.key == names.join_token_key(fleet.token_hash(added.token))
        assert added.token.encode() not in change.value and change.last == 0  # only the hash is stored
    else:
        with pytest.raises(ApiError, match="out of range"):
            core.plan_token_add(fleet.TokenAddRequest(ttl=ttl), "alice", NOW)


def test_tokens_unknown_expired_or_absurdly_long_are_refused():
    with pytest.raises(ApiError, match="unknown, already used, or removed"):
        core.check_token(None, NOW)
    with pytest.raises(ApiError, match="expired at"):
        core.check_token(fleet.JoinToken(type="node", expires=NOW - 1, created="", created_by=""), NOW)
    with pytest.raises(ApiError, match="1000000 characters"):
        core.token_digest("x" * 1_000_000)


def test_a_join_uses_the_token_up_in_the_same_write():
    changes = core.plan_join(join(), "ab" * 32, token_revision=7, now=NOW)
    assert [(c.key, c.value is None, c.last) for c in changes] == [
        (names.join_token_key("ab" * 32), True, 7), (names.node_key("web-1"), False, 0),
        (names.node_nkey_key(NKEY), False, 0)]


def test_the_callout_grants_a_node_only_its_own_subjects_in_a_signed_user_jwt():
    issuer = nats_jwt.new_account_seed()
    node = fleet.NodeRecord(name="web-1", server_id=SID, nkey=NKEY, joined="x")
    grant = core.grant_node(node, NOW)
    request = core.CalloutRequest(user_nkey=public_key_of(new_user_seed()), server_id="NSERVER")
    account = (nats_jwt.nkeys.PREFIX_BYTE_ACCOUNT,)
    response = nats_jwt.decode(core.callout_response(request, issuer, grant).decode(), account)
    assert response["aud"] == "NSERVER" and response["sub"] == request.user_nkey
    user = nats_jwt.decode(response["nats"]["jwt"], (nats_jwt.nkeys.PREFIX_BYTE_ACCOUNT,))
    assert user["name"] == "node:web-1" and user["exp"] == int(NOW) + core.NODE_JWT_SECONDS
    assert f"ringfence.audit.{SID}.>" in user["nats"]["pub"]["allow"]
    assert not any(s.startswith(("ringfence.audit.>", "$KV.ringfence_policy", "$JS.API.STREAM.DELETE"))
                   for s in user["nats"]["pub"]["allow"])
    refused = nats_jwt.decode(core.callout_response(request, issuer, None, "no").decode(),
                              (nats_jwt.nkeys.PREFIX_BYTE_ACCOUNT,))
    assert refused["nats"]["error"] == "no" and "jwt" not in refused["nats"]


def test_nodes_ls_lists_joined_nodes_then_nodes_that_only_report():
    a = fleet.NodeRecord(name="b-node", server_id="s1", nkey=NKEY, joined="j")
    status = fleet.NodeStatus(nodename="b-node", server_id="s1", seen=NOW)
    local = fleet.NodeStatus(nodename="a-local", server_id="s2", seen=NOW)
    listed = core.node_list([a], [status, local])
    assert [(n.name, n.joined, n.status is not None) for n in listed] == [("a-local", "", True), ("b-node", "j", True)]
