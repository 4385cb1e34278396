"""Every NATS subject, stream and KV bucket name Ringfence uses, in one place."""

from __future__ import annotations

import base64
import re

# --- services (NATS service discovery names) ---------------------------------
POLICY = "policy"
LOCKS = "locks"
ENFORCER = "enforcer"
AUDIT = "audit"
SERVICES = (POLICY, LOCKS, ENFORCER, AUDIT)
WEB = "web"  # the operator console (services/web); optional, so not among SERVICES
SERVICE_NAME_PREFIX = "ringfence-"


def service_name(short: str) -> str:
    """Discovery name of a service, e.g. 'ringfence-policy'."""
    return SERVICE_NAME_PREFIX + short


# --- audit -------------------------------------------------------------------
AUDIT_STREAM = "RINGFENCE_AUDIT"
AUDIT_SUBJECT_PREFIX = "ringfence.audit"
AUDIT_SUBJECTS = AUDIT_SUBJECT_PREFIX + ".>"
AUDIT_DURABLE = "audit-writer"


def audit_durable(instance: str) -> str:
    """The durable consumer of one audit service: each keeps its own (two services each
    write the whole log). `instance` is random (services/audit keeps it in the data dir), so
    holders of the CLI credential, who may read durable consumers of their own on the audit
    stream (`events tail --durable`), cannot read or change the writer's."""
    return f"{AUDIT_DURABLE}-{instance}"


# Every subject and key a node writes names the node: its server_id (the host_uuid in its data
# dir), so a node's NATS credential can be limited to its own (runtime/nats_security.py).
_NODE_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def node_token(server_id: str) -> str:
    """`server_id` as one subject token; ValueError when it could widen a subject (dots, wildcards)."""
    if not _NODE_TOKEN.match(server_id or ""):
        raise ValueError(f"server id {server_id[:80]!r} cannot name a node in a subject "
                         "(letters, digits, '_' and '-' only, at most 64)")
    return server_id


def audit_subject(server_id: str, event: str) -> str:
    """Subject the node `server_id` publishes an event of type `event` (e.g. 'session.network') on."""
    return f"{AUDIT_SUBJECT_PREFIX}.{node_token(server_id)}.{event}"


def audit_type_filter(event: str) -> str:
    """Events of one type from every node (e.g. `events tail --type`)."""
    return f"{AUDIT_SUBJECT_PREFIX}.*.{event}"


def audit_subject_parts(subject: str) -> tuple[str, str]:
    """(node token, event type) of an audit subject; ("", "") when it is not one."""
    parts = subject.split(".", 3)
    if len(parts) == 4 and f"{parts[0]}.{parts[1]}" == AUDIT_SUBJECT_PREFIX:
        return parts[2], parts[3]
    return "", ""


# Several events in one message (contract/batches.py); "batch" is no event type.
AUDIT_BATCH = "batch"


def audit_batch_subject(server_id: str) -> str:
    """Subject the node `server_id` publishes a batch of its events on."""
    return audit_subject(server_id, AUDIT_BATCH)


# --- session recordings ------------------------------------------------------
RECORDINGS_STREAM = "RINGFENCE_RECORDINGS"
RECORDING_SUBJECT_PREFIX = "ringfence.recording"
RECORDING_SUBJECTS = RECORDING_SUBJECT_PREFIX + ".>"
RECORDINGS_DURABLE = "recording-writer"


def recordings_durable(instance: str) -> str:
    return f"{RECORDINGS_DURABLE}-{instance}"


def recording_subject(server_id: str, sid: str) -> str:
    return f"{RECORDING_SUBJECT_PREFIX}.{node_token(server_id)}.{sid}"


# Live session output for `sessions join` (core NATS, not stored).
JOIN_SUBJECT_PREFIX = "ringfence.join"


def join_subject(server_id: str, join_id: str) -> str:
    """Sealed frames of one live join (ringfence/joinbox.py): only its joiner can open them."""
    return f"{JOIN_SUBJECT_PREFIX}.{node_token(server_id)}.{join_id}"


# --- KV buckets ----------------------------------------------------------------
POLICY_BUCKET = "ringfence_policy"  # network_restrictions, cap, roles, users
LOCKS_BUCKET = "ringfence_locks"  # one key per lock name
SESSIONS_BUCKET = "ringfence_sessions"  # one key per active session: session_key()
LEASES_BUCKET = "ringfence_leases"  # connection leases for max_connections: lease_key()
# Each node's own status (`ringfence nodes ls`): key = server_id, value contract.fleet.NodeStatus.
NODE_STATUS_BUCKET = "ringfence_node_status"
# Per writing service (key "policy", "locks"): the sequence of its bucket's stream up to
# which the audit event each write carries is published (runtime/audit_outbox.py).
AUDIT_CURSOR_BUCKET = "ringfence_audit_cursor"

NETWORK_RESTRICTIONS_KEY = "network_restrictions"
CAP_KEY = "cluster_auth_preference"
NETWORKING_KEY = "cluster_networking_config"
RECORDING_CONFIG_KEY = "session_recording_config"
ROLE_KEY_PREFIX = "role."
USER_KEY_PREFIX = "user."
# Fleet membership, in the policy bucket (the policy service answers the NATS auth callout):
JOIN_TOKEN_KEY_PREFIX = "jointoken."  # + sha256 hex of the token: contract.fleet.JoinToken
NODE_KEY_PREFIX = "node."  # + encoded node name: contract.fleet.NodeRecord
NODE_NKEY_KEY_PREFIX = "nodekey."  # + the node's public nkey: its node name (lookup at connect)


def encode_key_part(name: str) -> str:
    """KV keys allow only [-/_=.a-zA-Z0-9]; user names like alice@example.com do not fit.

    Names are stored base64url-encoded (no padding) so any name round-trips.
    """
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_key_part(part: str) -> str:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


def lease_key(user: str, server_id: str) -> str:
    """The LEASES_BUCKET key holding the SSH connection leases of `user` on node `server_id`
    (a node may write only its own: `conn.*.<server_id>`; a user's leases fleet-wide are
    `conn.<user>.*`)."""
    return f"conn.{encode_key_part(user)}.{node_token(server_id)}"


def session_key(server_id: str, sid: str) -> str:
    """The SESSIONS_BUCKET key of session `sid` on node `server_id` (a node writes `<server_id>.>` only)."""
    return f"{node_token(server_id)}.{sid}"


def join_token_key(token_hash: str) -> str:
    return JOIN_TOKEN_KEY_PREFIX + token_hash


def node_key(name: str) -> str:
    return NODE_KEY_PREFIX + encode_key_part(name)


def node_nkey_key(nkey: str) -> str:
    return NODE_NKEY_KEY_PREFIX + nkey


def role_key(name: str) -> str:
    return ROLE_KEY_PREFIX + encode_key_part(name)


def user_key(name: str) -> str:
    return USER_KEY_PREFIX + encode_key_part(name)


# --- request/reply APIs ------------------------------------------------------------
API_PREFIX = "ringfence.api"
POLICY_API = f"{API_PREFIX}.{POLICY}"  # .create .get .delete .update_user
LOCKS_API = f"{API_PREFIX}.{LOCKS}"  # .create .get .delete .unlock
AUDIT_API = f"{API_PREFIX}.{AUDIT}"  # .search .recordings .recording
ENFORCER_API = f"{API_PREFIX}.{ENFORCER}"  # .<server_id>.kill
WEB_API = f"{API_PREFIX}.{WEB}"  # .offer, then .<instance>.login on the instance that made the offer


def api_subject(api: str, verb: str) -> str:
    return f"{api}.{verb}"


def enforcer_subject(server_id: str, verb: str) -> str:
    return f"{ENFORCER_API}.{server_id}.{verb}"
