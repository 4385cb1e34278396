"""NATS credentials and permissions for the embedded nats-server (`ringfence up`).

One nkey per role: the four services, the CLI, and `up` itself (it creates
streams and buckets and the first admin before any service starts). `ringfence
up` keeps the seeds under `<data_dir>/nats/<role>.nk` (0600, created once) and
writes the public keys into nats-server.conf with the permissions below; a
client without one of these keys is refused.

What the permissions guarantee:
- only the policy service writes the policy bucket and only the locks service
  the locks bucket ($KV.<bucket>.> publishes, and the JetStream API calls that
  purge, delete, restore or reconfigure their streams are denied to the rest);
- only services publish audit events and recordings (ringfence.audit.>,
  ringfence.recording.>); the CLI never;
- only the service that owns an API subscribes to it, so nobody else can
  answer (or read) requests meant for it;
- the CLI may send control requests, ask service discovery ($SRV.>), follow
  the audit stream (`events tail`, also with durable consumers of its own), read
  the sessions bucket (`sessions ls`) and watch live sessions (`sessions join`),
  and nothing else;
- the web console (services/web) may send the control requests its pages make,
  read the policy and sessions buckets and the audit stream, receive the sealed
  frames of its joins and answer its own sign-in API, and write nothing.

Joined nodes (`ringfence node join`) are not in the file: the server asks the
policy service (NATS auth callout, `$SYS.REQ.USER.AUTH`) about every client that
is not one of the users above, and it answers with a user JWT signed by the
issuer account key (`issuer.nk`) carrying node_permissions(server_id): that
node's own subjects and keys only. `sys.nk` is a system-account user the policy
service uses to disconnect a removed node at once ($SYS.REQ.SERVER.<id>.KICK).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..auth import new_user_seed, public_key_of
from ..contract import names
from ..keyfiles import write_secret
from . import nats_jwt

CLI = "cli"
UP = "up"
WEB = names.WEB
ROLES = (names.POLICY, names.LOCKS, names.AUDIT, names.ENFORCER, CLI, UP, WEB)
SYSTEM = "sys"  # a NATS system-account user: kicks removed nodes' connections
ISSUER = "issuer"  # an account nkey (SA...): signs the user JWTs of joined nodes
SYSTEM_ACCOUNT = "SYS"
APP_ACCOUNT = "$G"  # where streams, buckets and every Ringfence user live
AUTH_CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
AUTH_TIMEOUT = 3

INBOXES = "_INBOX.>"
JS_API = "$JS.API"


def kv_subjects(bucket: str) -> str:
    return f"$KV.{bucket}.>"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


# Buckets a single service writes; every other client is kept from changing them.
OWNED_BUCKETS = {
    names.POLICY: (names.POLICY_BUCKET, names.AUDIT_CURSOR_BUCKET),
    names.LOCKS: (names.LOCKS_BUCKET, names.AUDIT_CURSOR_BUCKET),
    names.AUDIT: (),
    names.ENFORCER: (names.SESSIONS_BUCKET, names.LEASES_BUCKET, names.NODE_STATUS_BUCKET),
}
PROTECTED_BUCKETS = (names.POLICY_BUCKET, names.LOCKS_BUCKET, names.AUDIT_CURSOR_BUCKET)
STREAM_MUTATIONS = ("UPDATE", "DELETE", "PURGE", "MSG.DELETE", "RESTORE")

# Core subjects each service publishes besides JetStream, KV and replies.
SERVICE_PUBLISH = {
    names.POLICY: (names.AUDIT_SUBJECTS,),
    names.LOCKS: (names.AUDIT_SUBJECTS,),
    names.AUDIT: (),
    names.ENFORCER: (names.AUDIT_SUBJECTS, names.RECORDING_SUBJECTS, f"{names.JOIN_SUBJECT_PREFIX}.>"),
}


def _service_permissions(role: str) -> dict:
    publish = [
        f"{JS_API}.>",  # streams, buckets, consumers (mutations of others' buckets denied below)
        "$JS.ACK.>",  # acknowledging pull-consumer messages (audit)
        "$JS.FC.>",  # flow control of ordered consumers (KV watches)
        INBOXES,  # replies to requests, $SRV discovery included
        *SERVICE_PUBLISH[role],
        *(kv_subjects(b) for b in OWNED_BUCKETS[role]),
    ]
    deny = [
        f"{JS_API}.STREAM.{op}.{kv_stream(bucket)}"
        for bucket in PROTECTED_BUCKETS
        if bucket not in OWNED_BUCKETS[role]
        for op in STREAM_MUTATIONS
    ]
    deny += [kv_subjects(b) for b in PROTECTED_BUCKETS if b not in OWNED_BUCKETS[role]]
    found = {
        "publish": {"allow": publish, "deny": deny},
        "subscribe": {"allow": [INBOXES, "$SRV.>", f"{names.API_PREFIX}.{role}.>"]},
    }
    if role == names.POLICY:  # it answers the auth callout for joined nodes (services/policy/fleet.py),
        found["subscribe"]["allow"].append(AUTH_CALLOUT_SUBJECT)  # replying to the server's $SYS inbox
        found["allow_responses"] = True
    return found


def _cli_permissions() -> dict:
    sessions = kv_stream(names.SESSIONS_BUCKET)
    audit = names.AUDIT_STREAM
    publish = [
        f"{names.API_PREFIX}.>",  # control requests (signed; the services check them)
        "$SRV.>",  # service discovery (`ringfence status`)
        f"{JS_API}.INFO",
        f"{JS_API}.STREAM.INFO.{sessions}",  # `sessions ls` reads the sessions bucket
        f"{JS_API}.DIRECT.GET.{sessions}.>",
        f"{JS_API}.STREAM.MSG.GET.{sessions}",
        f"{JS_API}.STREAM.INFO.{audit}",  # `events tail` follows the audit stream
        # Ephemeral consumers (one token after CREATE: no durable, no name).
        f"{JS_API}.CONSUMER.CREATE.{sessions}",
        f"{JS_API}.CONSUMER.CREATE.{audit}",
        f"{JS_API}.CONSUMER.INFO.{sessions}.*",
        f"{JS_API}.CONSUMER.INFO.{audit}.*",
        "$JS.FC.>",  # flow control of those ordered consumers
        # `events tail --durable`: named consumers of the audit stream, read and acked. The audit
        # service's own consumers have random names (names.audit_durable) nobody else can guess.
        f"{JS_API}.CONSUMER.CREATE.{audit}.*.>",
        f"{JS_API}.CONSUMER.MSG.NEXT.{audit}.*",
        f"$JS.ACK.{audit}.>",
        f"{JS_API}.STREAM.MSG.GET.{audit}",  # what a killed run was handed, read in order

    ]
    return {
        "publish": {"allow": publish, "deny": [names.AUDIT_SUBJECTS, names.RECORDING_SUBJECTS, "$KV.>"]},
        # Joined sessions' frames: sealed to the joiner's key (ringfence/joinbox.py), so this
        # shared credential alone reads no terminal.
        "subscribe": {"allow": [INBOXES, f"{names.JOIN_SUBJECT_PREFIX}.>"]},
    }


# The control requests the console makes, each signed for its operator (services check the roles).
WEB_REQUESTS = (
    *(names.api_subject(names.POLICY_API, v) for v in ("create", "get", "delete")),
    *(names.api_subject(names.LOCKS_API, v) for v in ("create", "get", "delete", "lock", "unlock")),
    *(names.api_subject(names.AUDIT_API, v) for v in ("search", "recordings", "recording")),
    *(names.enforcer_subject("*", v) for v in ("join", "join_input", "kill")),
)


def _web_permissions() -> dict:
    """The console: signed requests on behalf of signed-in operators, reads of the policy bucket
    (to check `ringfence web login` requests), the locks bucket (a locked operator's requests are
    refused, as by every service), the sessions bucket and the audit stream (live tail), sealed
    frames of the joins it makes, and its own sign-in API. No writes to any bucket or stream."""
    reads = (kv_stream(names.POLICY_BUCKET), kv_stream(names.LOCKS_BUCKET), kv_stream(names.SESSIONS_BUCKET))
    audit = names.AUDIT_STREAM
    publish = [
        *WEB_REQUESTS,
        INBOXES,  # replies to `ringfence web login` and to discovery
        *(f"{JS_API}.STREAM.INFO.{s}" for s in (*reads, audit)),
        *(f"{JS_API}.DIRECT.GET.{s}.>" for s in reads),
        *(f"{JS_API}.STREAM.MSG.GET.{s}" for s in reads),
        # Ephemeral consumers only (one token after CREATE): KV watches and the live tail.
        *(f"{JS_API}.CONSUMER.CREATE.{s}" for s in (*reads, audit)),
        *(f"{JS_API}.CONSUMER.INFO.{s}.*" for s in (*reads, audit)),
        "$JS.FC.>",
    ]
    return {
        "publish": {"allow": publish, "deny": [names.AUDIT_SUBJECTS, names.RECORDING_SUBJECTS, "$KV.>"]},
        "subscribe": {"allow": [INBOXES, "$SRV.>", f"{names.WEB_API}.>", f"{names.JOIN_SUBJECT_PREFIX}.>"]},
    }


def _up_permissions() -> dict:
    """`ringfence up` before the services start: streams and buckets in their current shape (stream
    updates the services themselves may not make), and the bootstrap admin in the policy bucket."""
    return {
        "publish": {"allow": [f"{JS_API}.>", kv_subjects(names.POLICY_BUCKET), names.AUDIT_SUBJECTS, INBOXES]},
        "subscribe": {"allow": [INBOXES]},
    }


def permissions(role: str) -> dict:
    if role == CLI:
        return _cli_permissions()
    if role == UP:
        return _up_permissions()
    if role == WEB:
        return _web_permissions()
    if role in OWNED_BUCKETS:
        return _service_permissions(role)
    raise ValueError(f"unknown NATS role {role!r}; one of {', '.join(ROLES)}")


# --- joined nodes (user JWTs from the auth callout) ----------------------------------------------

# Streams a node reads (KV watches and gets): policy, locks and users; other nodes' leases.
NODE_READS = (names.POLICY_BUCKET, names.LOCKS_BUCKET, names.LEASES_BUCKET)


def node_inbox(server_id: str) -> str:
    """The inbox prefix of a node's connections; it may receive replies only there."""
    return f"_INBOX.{names.node_token(server_id)}"


def node_permissions(server_id: str) -> dict:
    """A joined node's enforcer: its own events, recordings, join frames, sessions, leases and
    status (every subject or key names its server_id), reads of policy, locks, users and leases,
    and its own API; no stream or bucket changes, no other node's subjects."""
    node = names.node_token(server_id)
    reads = [kv_stream(b) for b in NODE_READS]
    publish = [
        f"{JS_API}.INFO",
        f"{JS_API}.STREAM.INFO.*",  # start-up checks that streams and buckets exist
        *(f"{JS_API}.DIRECT.GET.{s}" for s in reads), *(f"{JS_API}.DIRECT.GET.{s}.>" for s in reads),
        *(f"{JS_API}.STREAM.MSG.GET.{s}" for s in reads),
        *(f"{JS_API}.CONSUMER.CREATE.{s}" for s in reads),  # ephemeral only (KV watches)
        *(f"{JS_API}.CONSUMER.INFO.{s}.*" for s in reads),
        *(f"{JS_API}.CONSUMER.DELETE.{s}.*" for s in reads),
        "$JS.FC.>",  # flow control of those watches
        f"{names.AUDIT_SUBJECT_PREFIX}.{node}.>",
        f"{names.RECORDING_SUBJECT_PREFIX}.{node}.>",
        f"{names.JOIN_SUBJECT_PREFIX}.{node}.>",  # the sealed frames of joins of its own sessions
        f"{kv_subjects(names.SESSIONS_BUCKET)[:-1]}{node}.>",
        f"{kv_subjects(names.LEASES_BUCKET)[:-1]}conn.*.{node}",
        f"{kv_subjects(names.NODE_STATUS_BUCKET)[:-1]}{node}",
    ]
    service = names.service_name(names.ENFORCER)
    subscribe = [f"{node_inbox(server_id)}.>", f"{names.ENFORCER_API}.{node}.>",
                 "$SRV.*", f"$SRV.*.{service}", f"$SRV.*.{service}.>"]
    return {"pub": {"allow": publish}, "sub": {"allow": subscribe}, "resp": {"max": 1, "ttl": 0}}


def join_permissions(inbox_prefix: str) -> dict:
    """A host holding a join token: the join request and its reply, nothing else."""
    from ..contract import fleet

    return {"pub": {"allow": [fleet.JOIN_SUBJECT]}, "sub": {"allow": [f"{inbox_prefix}.>"]}}


# --- the files `up` keeps --------------------------------------------------------------------------


def seed_path(nats_dir: Path, role: str) -> Path:
    return Path(nats_dir) / f"{role}.nk"


def _ensure_seed(path: Path, make) -> str:
    if not path.exists():
        try:
            write_secret(path, make() + "\n")
        except FileExistsError:  # created meanwhile by another `up`: use that one
            pass
    return path.read_text().strip()


def ensure_credentials(nats_dir: Path) -> dict[str, str]:
    """One nkey seed per role under `nats_dir` (created 0600 when missing), plus the system user
    and the callout issuer; {role: public key}."""
    publics = {role: public_key_of(_ensure_seed(seed_path(nats_dir, role), new_user_seed))
               for role in (*ROLES, SYSTEM)}
    publics[ISSUER] = nats_jwt.keypair(_ensure_seed(seed_path(nats_dir, ISSUER), nats_jwt.new_account_seed)) \
        .public_key.decode()
    return publics


def authorization_block(publics: dict[str, str]) -> str:
    """nats-server.conf: one nkey user per role; with an issuer, every other client is asked about
    (auth callout) and the system user may disconnect clients (JSON is valid NATS config)."""
    users = [{"nkey": publics[role], "permissions": permissions(role)} for role in ROLES if role in publics]
    # Seconds a client may take to authenticate; a callout nobody answers refuses it after this.
    authorization: dict = {"users": users, "timeout": AUTH_TIMEOUT}
    text = ""
    if ISSUER in publics and SYSTEM in publics:
        authorization["auth_callout"] = {"issuer": publics[ISSUER],
                                         "auth_users": [u["nkey"] for u in users] + [publics[SYSTEM]]}
        text += "accounts " + json.dumps({SYSTEM_ACCOUNT: {"users": [{"nkey": publics[SYSTEM]}]}}, indent=2) + "\n"
        text += f"system_account: {SYSTEM_ACCOUNT}\n"
    return text + "authorization " + json.dumps(authorization, indent=2) + "\n"
