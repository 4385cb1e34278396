"""Every NATS subject, stream and KV bucket name Ringfence uses, in one place."""

from __future__ import annotations

import base64

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


def audit_subject(event: str) -> str:
    """Subject an event of type `event` (e.g. 'session.network') is published on."""
    return f"{AUDIT_SUBJECT_PREFIX}.{event}"


# Several events in one message (contract/batches.py); "batch" is no event type.
AUDIT_BATCH_SUBJECT = AUDIT_SUBJECT_PREFIX + ".batch"


# --- session recordings ------------------------------------------------------
RECORDINGS_STREAM = "RINGFENCE_RECORDINGS"
RECORDING_SUBJECT_PREFIX = "ringfence.recording"
RECORDING_SUBJECTS = RECORDING_SUBJECT_PREFIX + ".>"
RECORDINGS_DURABLE = "recording-writer"


def recordings_durable(instance: str) -> str:
    return f"{RECORDINGS_DURABLE}-{instance}"


def recording_subject(sid: str) -> str:
    return f"{RECORDING_SUBJECT_PREFIX}.{sid}"


# Live session output for `sessions join` (core NATS, not stored).
JOIN_SUBJECT_PREFIX = "ringfence.join"


def join_subject(server_id: str, join_id: str) -> str:
    """Sealed frames of one live join (ringfence/joinbox.py): only its joiner can open them."""
    return f"{JOIN_SUBJECT_PREFIX}.{server_id}.{join_id}"


# --- KV buckets ----------------------------------------------------------------
POLICY_BUCKET = "ringfence_policy"  # network_restrictions, cap, roles, users
LOCKS_BUCKET = "ringfence_locks"  # one key per lock name
SESSIONS_BUCKET = "ringfence_sessions"  # one key per active session id
LEASES_BUCKET = "ringfence_leases"  # connection leases for max_connections
# Per writing service (key "policy", "locks"): the sequence of its bucket's stream up to
# which the audit event each write carries is published (runtime/audit_outbox.py).
AUDIT_CURSOR_BUCKET = "ringfence_audit_cursor"

NETWORK_RESTRICTIONS_KEY = "network_restrictions"
CAP_KEY = "cluster_auth_preference"
NETWORKING_KEY = "cluster_networking_config"
RECORDING_CONFIG_KEY = "session_recording_config"
ROLE_KEY_PREFIX = "role."
USER_KEY_PREFIX = "user."


def encode_key_part(name: str) -> str:
    """KV keys allow only [-/_=.a-zA-Z0-9]; user names like alice@example.com do not fit.

    Names are stored base64url-encoded (no padding) so any name round-trips.
    """
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_key_part(part: str) -> str:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


def lease_key(user: str) -> str:
    """The LEASES_BUCKET key holding a user's SSH connection leases."""
    return "conn." + encode_key_part(user)


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
