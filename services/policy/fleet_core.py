"""Fleet membership decisions, without I/O: join tokens, joins, removals, and what the NATS
auth callout answers. The adapter (fleet.py) reads the policy bucket, asks this module,
then writes (through the policy adapter's atomic, event-carrying writes)."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

import msgspec

from ringfence.config import NODENAME_PATTERN
from ringfence.contract import events as ev
from ringfence.contract import fleet, names
from ringfence.contract.api import ApiError
from ringfence.runtime import nats_jwt, nats_security

from .core import Change

# A joined node's NATS user JWT lives this long; it reconnects through the callout for a new one.
# `nodes rm` disconnects at once; this bounds it where that cannot be done (no system credential).
NODE_JWT_SECONDS = 3600
JOIN_JWT_SECONDS = 300  # a token holder's connection: long enough to send the join request
MIN_TOKEN_TTL = 1
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def rfc3339(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def decode_body(data: bytes, type_: type):
    """A request body (an empty one is {}); ApiError naming the problem when it does not decode."""
    try:
        return msgspec.json.decode(data or b"{}", type=type_)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # bad UTF-8, deep nesting
        raise ApiError(f"malformed request: {exc}") from None


# --- tokens --------------------------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_hex(24)


def plan_token_add(req: fleet.TokenAddRequest, actor: str, now: float) -> tuple[fleet.TokenAdded, Change]:
    if req.type not in fleet.TOKEN_TYPES:
        raise ApiError(f'token type "{req.type[:40]}" is not supported; use {", ".join(fleet.TOKEN_TYPES)}')
    if not MIN_TOKEN_TTL <= req.ttl <= fleet.MAX_TOKEN_TTL:
        raise ApiError(f"--ttl {req.ttl:g}s is out of range: a join token lasts between {MIN_TOKEN_TTL}s and "
                       f"{fleet.MAX_TOKEN_TTL // 3600}h")
    token = new_token()
    digest = fleet.token_hash(token)
    record = fleet.JoinToken(type=req.type, expires=now + req.ttl, created=rfc3339(now), created_by=actor)
    event = ev.JoinTokenCreated(user=actor, token_id=fleet.token_id(digest), type=req.type,
                                expires=rfc3339(record.expires))
    change = Change(names.join_token_key(digest), msgspec.json.encode(record),
                    f"join token {fleet.token_id(digest)} has been created", event, last=0)
    return fleet.TokenAdded(token=token, token_id=fleet.token_id(digest), type=req.type, expires=record.expires), change


def token_hashes_matching(given: str, stored_hashes: list[str]) -> list[str]:
    """`tokens rm` takes the token itself or its id (a prefix of its hash)."""
    digest = fleet.token_hash(given)
    if digest in stored_hashes:
        return [digest]
    if len(given) < 8 or not re.fullmatch(r"[0-9a-f]+", given):
        return []
    return [h for h in stored_hashes if h.startswith(given)]


def plan_token_rm(digest: str, actor: str, reason: str = "deleted") -> Change:
    event = ev.JoinTokenDeleted(user=actor, token_id=fleet.token_id(digest), reason=reason)
    return Change(names.join_token_key(digest), None, f"join token {fleet.token_id(digest)} has been deleted", event)


MAX_TOKEN_LEN = 128  # ours are 48 hex characters; anything much longer is not one


def token_digest(text: str) -> str:
    """The stored form of a presented token; ApiError for text no token of ours can be."""
    if not 0 < len(text) <= MAX_TOKEN_LEN:
        raise ApiError(f"the join token is not valid: {len(text)} characters", "access_denied")
    return fleet.token_hash(text)


def check_token(token: fleet.JoinToken | None, now: float) -> fleet.JoinToken:
    if token is None:
        raise ApiError("the join token is not valid: unknown, already used, or removed; "
                       "ask an operator for a new one (`ringfence tokens add --type node`)", "access_denied")
    if token.expires <= now:
        raise ApiError(f"the join token expired at {rfc3339(token.expires)}; ask an operator for a new one",
                       "access_denied")
    return token


# --- joining and leaving ----------------------------------------------------------------------------


def check_join(req: fleet.JoinRequest, nodes: list[fleet.NodeRecord]) -> None:
    if not re.fullmatch(NODENAME_PATTERN, req.nodename):
        raise ApiError(f'nodename "{req.nodename[:80]}": use letters, digits, ".", "_" or "-" (at most 63)')
    if not _UUID.match(req.server_id):
        raise ApiError(f'server_id "{req.server_id[:80]}" is not a host UUID (<data_dir>/host_uuid)')
    try:
        nats_jwt.verify_key(req.nkey, (nats_jwt.nkeys.PREFIX_BYTE_USER,))
    except nats_jwt.JwtError as exc:
        raise ApiError(f"nkey: {exc}") from None
    for node in nodes:
        if node.name == req.nodename:
            raise ApiError(f'node "{req.nodename}" has already joined; remove it first with '
                           f"`ringfence nodes rm {req.nodename}`", "already_exists")
        if node.server_id == req.server_id:
            raise ApiError(f'server id {req.server_id} already belongs to node "{node.name}"; a host joins once '
                           f"(`ringfence nodes rm {node.name}` first)", "already_exists")
        if node.nkey == req.nkey:
            raise ApiError(f'that nkey already belongs to node "{node.name}"', "already_exists")


def plan_join(req: fleet.JoinRequest, digest: str, token_revision: int, now: float) -> list[Change]:
    """The token is used up and the node recorded, in one atomic write: a token joins one node."""
    tid = fleet.token_id(digest)
    record = fleet.NodeRecord(name=req.nodename, server_id=req.server_id, nkey=req.nkey, joined=rfc3339(now),
                              token_id=tid, version=req.version[:40])
    joined = ev.NodeJoined(node=req.nodename, node_server_id=req.server_id, nkey=req.nkey, token_id=tid)
    used = ev.JoinTokenDeleted(token_id=tid, reason="used")
    return [
        Change(names.join_token_key(digest), None, f"join token {tid} has been used", used, last=token_revision),
        Change(names.node_key(req.nodename), msgspec.json.encode(record),
               f'node "{req.nodename}" has joined', joined, last=0),
        Change(names.node_nkey_key(req.nkey), req.nodename.encode(), "", None, last=0),
    ]


def plan_node_rm(node: fleet.NodeRecord, actor: str) -> list[Change]:
    removed = ev.NodeRemoved(user=actor, node=node.name, node_server_id=node.server_id)
    return [
        Change(names.node_key(node.name), None, f'node "{node.name}" has been removed', removed),
        Change(names.node_nkey_key(node.nkey), None, "", None),
    ]


def node_list(records: list[fleet.NodeRecord], statuses: list[fleet.NodeStatus]) -> list[fleet.NodeInfo]:
    """Joined nodes with their status, then nodes that report status without having joined
    (control-plane enforcers with a static credential), by name."""
    by_id = {s.server_id: s for s in statuses}
    found = [fleet.NodeInfo(name=r.name, server_id=r.server_id, joined=r.joined, status=by_id.pop(r.server_id, None))
             for r in records]
    found += [fleet.NodeInfo(name=s.nodename, server_id=s.server_id, status=s) for s in by_id.values()]
    return sorted(found, key=lambda n: (n.name, n.server_id))


# --- the NATS auth callout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CalloutRequest:
    """What the server asks about a connecting client (from its authorization request JWT)."""

    user_nkey: str  # the key the server generated for this connection: the JWT's subject
    server_id: str  # the asking server: the response's audience
    client_nkey: str = ""
    nonce: str = ""
    signature: str = ""
    token: str = ""
    client: str = ""  # host and name, for the log


def parse_callout(claims: dict) -> CalloutRequest:
    body = claims.get("nats") or {}
    opts = body.get("connect_opts") or {}
    info = body.get("client_info") or {}
    server = body.get("server_id") or {}
    if not body.get("user_nkey") or not server.get("id"):
        raise nats_jwt.JwtError("authorization request without user_nkey or server_id")
    return CalloutRequest(user_nkey=body["user_nkey"], server_id=server["id"], client_nkey=opts.get("nkey") or "",
                          nonce=info.get("nonce") or "", signature=opts.get("sig") or "",
                          token=opts.get("auth_token") or "", client=f"{info.get('host', '?')} {opts.get('name', '')}")


@dataclass(frozen=True)
class Grant:
    name: str  # shown as the connection's user (`node:<name>`; `nodes rm` finds it by that)
    permissions: dict
    expires: int


def node_user_name(nodename: str) -> str:
    return f"node:{nodename}"


def grant_node(node: fleet.NodeRecord, now: float) -> Grant:
    return Grant(node_user_name(node.name), nats_security.node_permissions(node.server_id),
                 int(now) + NODE_JWT_SECONDS)


def grant_join(token: fleet.JoinToken, digest: str, now: float) -> Grant:
    inbox = f"{fleet.JOIN_INBOX_PREFIX}.{fleet.token_id(digest)}"
    return Grant(f"join:{fleet.token_id(digest)}", nats_security.join_permissions(inbox),
                 int(min(token.expires, now + JOIN_JWT_SECONDS)))


def callout_response(req: CalloutRequest, issuer_seed: str, grant: Grant | None, error: str = "") -> bytes:
    user_token = ""
    if grant is not None:
        user_token = nats_jwt.user_jwt(user_nkey=req.user_nkey, account=nats_security.APP_ACCOUNT, name=grant.name,
                                       permissions=grant.permissions, expires=grant.expires, issuer_seed=issuer_seed)
    return nats_jwt.authorization_response(user_nkey=req.user_nkey, server_id=req.server_id, issuer_seed=issuer_seed,
                                           user_token=user_token, error=error).encode()
