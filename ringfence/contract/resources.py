"""Resources an operator creates with `ringfence create -f`, as stored in KV.

Field names, kinds and versions follow the system the seeds describe, so that
existing YAML files keep working. Decoding is strict: unknown fields are
rejected. Semantic checks (CIDR syntax, durations, limits) live in the owning
service's core, not here.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct, field

# Hard caps that bound the work any single resource can cause.
MAX_NAME_LEN = 253
MAX_CIDRS_PER_LIST = 131_072  # per list (allow, deny); the original stopped at 256/384
MAX_LIST_ITEMS = 1_024  # roles per user, rules per role, keys per user, ...
MAX_MESSAGE_LEN = 4_096


class Metadata(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    revision: str = ""


class Resource(Struct, tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    """Base of every resource; `kind` is the tag that selects the type."""


# --- network_restrictions (seed 000) ------------------------------------------
class CIDRRule(Struct, forbid_unknown_fields=True):
    cidr: str


class NetworkRestrictionsSpec(Struct, forbid_unknown_fields=True):
    allow: list[CIDRRule] = field(default_factory=list)
    deny: list[CIDRRule] = field(default_factory=list)


NETWORK_RESTRICTIONS_NAME = "network-restrictions"


class NetworkRestrictions(Resource, tag="network_restrictions", kw_only=True):
    version: Literal["v4"]
    metadata: Metadata = field(default_factory=lambda: Metadata(name=NETWORK_RESTRICTIONS_NAME))
    spec: NetworkRestrictionsSpec = field(default_factory=NetworkRestrictionsSpec)


# --- roles and users ------------------------------------------------------------
class Rule(Struct, forbid_unknown_fields=True):
    resources: list[str]
    verbs: list[str]


class JoinSessions(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The original's join_sessions: whose sessions (by the roles of the session's user;
    "*" any), of which kinds ("ssh", "*"), in which modes (observer, peer, moderator)."""

    name: str = ""
    roles: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=lambda: ["*"])
    modes: list[Literal["observer", "peer", "moderator"]] = field(default_factory=list)


class RoleConditions(Struct, forbid_unknown_fields=True, omit_defaults=True):
    rules: list[Rule] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    join_sessions: list[JoinSessions] = field(default_factory=list)


class RoleOptions(Struct, forbid_unknown_fields=True, omit_defaults=True):
    lock: Literal["strict", "best_effort"] | None = None
    max_connections: int = 0
    max_sessions: int = 0
    client_idle_timeout: str = ""  # Go-style duration, e.g. "15m"


class RoleSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    allow: RoleConditions = field(default_factory=RoleConditions)
    deny: RoleConditions = field(default_factory=RoleConditions)
    options: RoleOptions = field(default_factory=RoleOptions)


class Role(Resource, tag="role", kw_only=True):
    version: Literal["v5", "v6", "v7"] = "v5"
    metadata: Metadata
    spec: RoleSpec = field(default_factory=RoleSpec)


class UserSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    roles: list[str] = field(default_factory=list)
    # OpenSSH public keys ("ssh-ed25519 AAAA... comment") that identify this user.
    ssh_public_keys: list[str] = field(default_factory=list)
    # Public nkey ("U...") of an operator identity; requests signed by it act as this user.
    operator_nkey: str = ""


class User(Resource, tag="user", kw_only=True):
    version: Literal["v2"] = "v2"
    metadata: Metadata
    spec: UserSpec = field(default_factory=UserSpec)


# --- cluster settings --------------------------------------------------------------
CAP_NAME = "cluster-auth-preference"
NETWORKING_NAME = "cluster-networking-config"


class ClusterAuthPreferenceSpec(Struct, forbid_unknown_fields=True):
    locking_mode: Literal["best_effort", "strict"] = "best_effort"


class ClusterAuthPreference(Resource, tag="cluster_auth_preference", kw_only=True):
    version: Literal["v2"] = "v2"
    metadata: Metadata = field(default_factory=lambda: Metadata(name=CAP_NAME))
    spec: ClusterAuthPreferenceSpec = field(default_factory=ClusterAuthPreferenceSpec)


class ClusterNetworkingConfigSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    client_idle_timeout: str = ""  # "" or "0s" means no idle limit


class ClusterNetworkingConfig(Resource, tag="cluster_networking_config", kw_only=True):
    version: Literal["v2"] = "v2"
    metadata: Metadata = field(default_factory=lambda: Metadata(name=NETWORKING_NAME))
    spec: ClusterNetworkingConfigSpec = field(default_factory=ClusterNetworkingConfigSpec)


# Singletons the policy service writes from its config file (auth_service) carry this label;
# `create -f` and `rm` leave them alone while the file sets them (as the original's static config).
ORIGIN_LABEL = "ringfence.dev/origin"
ORIGIN_CONFIG_FILE = "config-file"

RECORDING_CONFIG_NAME = "session-recording-config"


class SessionRecordingConfigSpec(Struct, forbid_unknown_fields=True):
    # node: recorded on the node, streamed as it runs; node-sync: the session fails when its
    # recording cannot be written; off: not recorded (the original's proxy modes do not exist here).
    mode: Literal["node", "node-sync", "off"] = "node"


class SessionRecordingConfig(Resource, tag="session_recording_config", kw_only=True):
    version: Literal["v2"] = "v2"
    metadata: Metadata = field(default_factory=lambda: Metadata(name=RECORDING_CONFIG_NAME))
    spec: SessionRecordingConfigSpec = field(default_factory=SessionRecordingConfigSpec)


# --- locks (seed 004) ------------------------------------------------------------------
LOCK_TARGET_FIELDS = (
    "user",
    "role",
    "login",
    "server_id",
    "mfa_device",
    "device",
    "access_request",
    "windows_desktop",
)

# How a target field is printed in messages: lock targeting User:"foo" ...
LOCK_TARGET_LABELS = {
    "user": "User",
    "role": "Role",
    "login": "Login",
    "server_id": "Node",
    "mfa_device": "MFADevice",
    "device": "Device",
    "access_request": "AccessRequest",
    "windows_desktop": "WindowsDesktop",
}


class LockTarget(Struct, forbid_unknown_fields=True, omit_defaults=True):
    user: str = ""
    role: str = ""
    login: str = ""
    server_id: str = ""
    mfa_device: str = ""
    device: str = ""
    access_request: str = ""
    windows_desktop: str = ""

    def fields(self) -> dict[str, str]:
        """The target fields that are set, in canonical order."""
        return {f: getattr(self, f) for f in LOCK_TARGET_FIELDS if getattr(self, f)}

    def describe(self) -> str:
        """`User:"alice"`, or several joined by commas."""
        return ", ".join(f'{LOCK_TARGET_LABELS[k]}:"{v}"' for k, v in self.fields().items())


class LockSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    target: LockTarget
    message: str = ""
    expires: str = ""  # RFC 3339; empty means "until removed"
    created_by: str = ""
    created: str = ""


class Lock(Resource, tag="lock", kw_only=True):
    version: Literal["v2"] = "v2"
    metadata: Metadata
    spec: LockSpec


AnyResource = (NetworkRestrictions | Role | User | ClusterAuthPreference | ClusterNetworkingConfig
               | SessionRecordingConfig | Lock)

RESOURCE_TYPES: dict[str, type[Resource]] = {
    t.__struct_config__.tag: t  # type: ignore[misc]
    for t in (NetworkRestrictions, Role, User, ClusterAuthPreference, ClusterNetworkingConfig, SessionRecordingConfig,
              Lock)
}

# Kinds each service owns; the CLI routes `create -f` documents by this.
POLICY_KINDS = ("network_restrictions", "role", "user", "cluster_auth_preference", "cluster_networking_config",
                "session_recording_config")
LOCK_KINDS = ("lock",)

# Names users type on the command line for each kind (`ringfence get cap`).
KIND_ALIASES = {
    "network_restrictions": "network_restrictions",
    "network-restrictions": "network_restrictions",
    "net_restrict": "network_restrictions",
    "role": "role",
    "roles": "role",
    "user": "user",
    "users": "user",
    "cluster_auth_preference": "cluster_auth_preference",
    "cap": "cluster_auth_preference",
    "cluster_networking_config": "cluster_networking_config",
    "networking": "cluster_networking_config",
    "session_recording_config": "session_recording_config",
    "rec_config": "session_recording_config",
    "lock": "lock",
    "locks": "lock",
}


def encode(resource: Resource) -> bytes:
    return msgspec.json.encode(resource)


def decode(data: bytes, kind: type[Resource] | None = None) -> AnyResource:
    return msgspec.json.decode(data, type=kind or AnyResource)
