"""Fleet membership on the wire: join tokens, joined nodes, and each node's status.

A join token (`ringfence tokens add --type node`) lets one host join once before it
expires. The policy service keeps only the token's sha256 (names.join_token_key), so
reading the policy bucket never reveals a usable token. A joined node is a NodeRecord
(names.node_key) with the public nkey its host generated; the NATS auth callout
(services/policy/fleet.py) admits that nkey with permissions naming the node's
server_id, and `ringfence nodes rm` takes it away at once.
"""

from __future__ import annotations

import hashlib

from msgspec import Struct, field

from . import names

TOKEN_TYPES = ("node",)
MAX_TOKEN_TTL = 7 * 24 * 3600  # seconds: a join token is for joining now, not a standing credential
TOKEN_ID_LEN = 16  # hex characters of the hash shown by `tokens ls` and accepted by `tokens rm`

JOIN_SUBJECT = names.api_subject(names.POLICY_API, "join")
TOKENS_ADD_SUBJECT = names.api_subject(names.POLICY_API, "tokens.add")
TOKENS_LS_SUBJECT = names.api_subject(names.POLICY_API, "tokens.ls")
TOKENS_RM_SUBJECT = names.api_subject(names.POLICY_API, "tokens.rm")
NODES_LS_SUBJECT = names.api_subject(names.POLICY_API, "nodes.ls")
NODES_RM_SUBJECT = names.api_subject(names.POLICY_API, "nodes.rm")
# A host joining with a token receives replies only under this prefix + "." + its token id.
JOIN_INBOX_PREFIX = "_INBOX_JOIN"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token_hash_hex: str) -> str:
    return token_hash_hex[:TOKEN_ID_LEN]


def join_inbox_prefix(token: str) -> str:
    return f"{JOIN_INBOX_PREFIX}.{token_id(token_hash(token))}"


class JoinToken(Struct, forbid_unknown_fields=True):
    type: str
    expires: float  # unix seconds
    created: str  # RFC 3339
    created_by: str


class NodeRecord(Struct, forbid_unknown_fields=True):
    name: str
    server_id: str
    nkey: str  # the public user nkey; the seed never left the node
    joined: str  # RFC 3339
    token_id: str = ""
    version: str = ""  # of the `ringfence node join` that joined it


class NodeStatus(Struct):
    """What a node's enforcer last said about itself (names.NODE_STATUS_BUCKET, key = server_id)."""

    nodename: str
    server_id: str
    hostname: str = ""
    version: str = ""
    seen: float = 0.0  # unix seconds
    policy_revision: int = 0
    lock_view_age: float = -1.0  # seconds since the lock view was last confirmed current; -1 unknown


# --- requests and replies ---------------------------------------------------------------------


class TokenAddRequest(Struct, forbid_unknown_fields=True):
    type: str = "node"
    ttl: float = 3600.0  # seconds


class TokenAdded(Struct):
    token: str
    token_id: str
    type: str
    expires: float


class TokenInfo(Struct):
    token_id: str
    type: str
    expires: float
    created: str
    created_by: str


class TokenRmRequest(Struct, forbid_unknown_fields=True):
    token: str  # the token itself, or its id (a prefix of its hash, at least 8 characters)


class JoinRequest(Struct, forbid_unknown_fields=True):
    token: str
    nodename: str
    server_id: str
    nkey: str
    version: str = ""


class JoinReply(Struct):
    nodename: str
    server_id: str
    cluster_name: str


class NodeInfo(Struct):
    """One line of `ringfence nodes ls`: a joined node, a node that reports status, or both."""

    name: str
    server_id: str
    joined: str = ""  # empty: not joined with a token (a control-plane node with a static credential)
    status: NodeStatus | None = None


class NodeRmRequest(Struct, forbid_unknown_fields=True):
    name: str


class NodeRemoved(Struct):
    name: str
    connections_closed: int = 0
    kicked: bool = False  # False: no NATS system credential here; open connections end when their JWT expires
    message: str = field(default="")
