"""The policy service's decisions, without I/O.

The adapter reads what exists, asks this module what to change, then writes.
Every document of a request is checked before anything is planned, so a bad
document anywhere means nothing changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ringfence.contract import api, events, names, strict
from ringfence.contract import resources as r
from ringfence.contract.documents import document_label, format_problems, quote, show
from ringfence.sshkeys import line_fingerprint

from .checks import check

SINGLETON_KEYS = {
    "network_restrictions": names.NETWORK_RESTRICTIONS_KEY,
    "cluster_auth_preference": names.CAP_KEY,
    "cluster_networking_config": names.NETWORKING_KEY,
    "session_recording_config": names.RECORDING_CONFIG_KEY,
}
SINGLETON_NAMES = {
    "network_restrictions": r.NETWORK_RESTRICTIONS_NAME,
    "cluster_auth_preference": r.CAP_NAME,
    "cluster_networking_config": r.NETWORKING_NAME,
    "session_recording_config": r.RECORDING_CONFIG_NAME,
}
NAMED_KEY_PREFIXES = {"role": names.ROLE_KEY_PREFIX, "user": names.USER_KEY_PREFIX}
NAMED_KEYS = {"role": names.role_key, "user": names.user_key}

# What `get` shows for a singleton nobody created: the settings in force.
# network_restrictions has none: without the resource everything is allowed.
DEFAULTS: dict[str, r.Resource] = {
    "cluster_auth_preference": r.ClusterAuthPreference(),
    "cluster_networking_config": r.ClusterNetworkingConfig(),
    "session_recording_config": r.SessionRecordingConfig(),
}
# The config file setting (auth_service) that fixes each singleton it can set.
STATIC_SETTINGS = {
    "cluster_auth_preference": "auth_service.authentication.locking_mode",
    "cluster_networking_config": "auth_service.client_idle_timeout",
    "session_recording_config": "auth_service.session_recording",
}

NETWORK_RESTRICTIONS_UPDATED = "network restrictions have been updated"
NETWORK_RESTRICTIONS_RESET = "network restrictions have been reset to defaults (allow all)"
CAP_UPDATED = "cluster auth preference has been updated"
CAP_RESET = "cluster auth preference has been reset to defaults"
NETWORKING_UPDATED = "cluster networking configuration has been updated"
NETWORKING_RESET = "cluster networking configuration has been reset to defaults"
RECORDING_UPDATED = "session recording configuration has been updated"
RECORDING_RESET = "session recording configuration has been reset to defaults"


@dataclass(frozen=True)
class Document:
    label: str  # `document 2 (role "x")`, how errors and warnings name it
    resource: r.Resource  # checked, in the form to store


@dataclass(frozen=True)
class Change:
    key: str
    value: bytes | None  # None deletes the key
    message: str
    event: events.AuditEvent | None  # None: a key written alongside another change (no event of its own)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    last: int | None = None  # only if the key is still at this revision (0: only if it has none)


def canonical_kind(text: str) -> str:
    kind = r.KIND_ALIASES.get(text)
    if kind is None:
        known = ", ".join(sorted(set(r.KIND_ALIASES.values())))
        raise api.ApiError(f"unknown kind {quote(text)}; use one of {known}")
    if kind in r.LOCK_KINDS:
        raise api.ApiError(f'kind "{kind}" is served by the locks service, not the policy service')
    return kind


# --- create ----------------------------------------------------------------------------


def storage_key(res: r.Resource) -> str:
    kind = res.__struct_config__.tag
    if kind in SINGLETON_KEYS:
        return SINGLETON_KEYS[kind]
    return NAMED_KEYS[kind](res.metadata.name)  # type: ignore[attr-defined]


def document_key(doc: Any) -> tuple[str, str]:
    """(kind, storage key) of a document not checked yet; ("", "") for no policy kind, and no
    key when the name is missing (the create reports both)."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if not isinstance(kind, str) or kind not in r.POLICY_KINDS:
        return "", ""
    if kind in SINGLETON_KEYS:
        return kind, SINGLETON_KEYS[kind]
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name or len(name) > r.MAX_NAME_LEN:
        return kind, ""
    return kind, NAMED_KEYS[kind](name)


def check_documents(docs: list[Any]) -> list[Document]:
    """Decode and check every document; raise one ApiError naming every problem."""
    problems: list[str] = []
    checked: list[Document] = []
    first_of_key: dict[str, int] = {}
    for position, doc in enumerate(docs, 1):
        label = document_label(position, doc)
        try:
            decoded = strict.convert(doc, r.AnyResource)
        except strict.DecodeError as exc:
            problems.append(f"{label}: {exc}")
            continue
        found, stored = check(decoded)
        if not found:
            key = storage_key(stored)
            if key in first_of_key:
                # Which of two versions should win is a guess; make the user say.
                found = [f"the request already contains this resource (document {first_of_key[key]})"]
            first_of_key.setdefault(key, position)
        problems.extend(f"{label}: {p}" for p in found)
        checked.append(Document(label, stored))
    if problems:
        raise api.ApiError(format_problems(problems))
    return checked


def _defined_roles(docs: list[Document]) -> set[str]:
    return {d.resource.metadata.name for d in docs if isinstance(d.resource, r.Role)}


def referenced_roles(docs: list[Document]) -> set[str]:
    """Roles users in the request refer to that the request does not define itself."""
    wanted = {role for d in docs if isinstance(d.resource, r.User) for role in d.resource.spec.roles}
    return wanted - _defined_roles(docs)


def plan_create(
    docs: list[Document],
    existing_keys: set[str],
    existing_roles: set[str],
    actor: str,
    max_value_bytes: int,
    static_keys: set[str] | frozenset[str] = frozenset(),
) -> list[Change]:
    """One change per document.

    `existing_keys`: which of the documents' keys hold a resource now (decides
    "created" or "updated"). `existing_roles`: which referenced roles exist.
    Users may name roles that do not exist yet, so that users and roles can be
    created in any order (and a role can be re-created); they get a warning.
    `static_keys`: singletons the config file sets, which are refused.
    """
    changes: list[Change] = []
    too_big: list[str] = []
    available_roles = existing_roles | _defined_roles(docs)
    for doc in docs:
        res = doc.resource
        value = r.encode(res)
        if len(value) > max_value_bytes:
            too_big.append(
                f"{doc.label}: {len(value)} bytes once encoded; NATS carries at most {max_value_bytes} "
                "per message (max_payload)"
            )
        refuse_static(res.__struct_config__.tag, storage_key(res), static_keys)  # type: ignore[arg-type]
        existed = storage_key(res) in existing_keys
        message, event = _created(res, existed)
        event.user = actor
        warnings: tuple[str, ...] = ()
        if isinstance(res, r.User):
            missing = [role for role in res.spec.roles if role not in available_roles]
            warnings = tuple(
                f"warning: user {quote(res.metadata.name)} refers to role {quote(role)}, which does not exist yet"
                for role in missing
            )
        changes.append(Change(storage_key(res), value, message, event, warnings))
    if too_big:
        raise api.ApiError(format_problems(too_big))
    return changes


def _created(res: r.Resource, existed: bool) -> tuple[str, events.AuditEvent]:
    verb = "updated" if existed else "created"
    if isinstance(res, r.NetworkRestrictions):
        counts = events.NetworkRestrictionsUpdated(allow=len(res.spec.allow), deny=len(res.spec.deny))
        return NETWORK_RESTRICTIONS_UPDATED, counts
    if isinstance(res, r.Role):
        # The original emits role.created for updates too; there is no role.updated.
        return f"role '{res.metadata.name}' has been {verb}", events.RoleCreated(name=res.metadata.name)
    if isinstance(res, r.User):
        event = events.UserCreated(name=res.metadata.name, roles=list(res.spec.roles))
        return f"user {quote(res.metadata.name)} has been {verb}", event
    if isinstance(res, r.ClusterAuthPreference):
        return CAP_UPDATED, events.CapUpdated(locking_mode=res.spec.locking_mode)
    if isinstance(res, r.ClusterNetworkingConfig):
        event = events.NetworkingConfigUpdated(client_idle_timeout=res.spec.client_idle_timeout)
        return NETWORKING_UPDATED, event
    if isinstance(res, r.SessionRecordingConfig):
        return RECORDING_UPDATED, events.RecordingConfigUpdated(mode=res.spec.mode)
    raise AssertionError(f"unplanned kind {type(res).__name__}")  # check() admits no other kind


def create_messages(changes: list[Change]) -> list[str]:
    return [line for c in changes for line in (c.message, *c.warnings)]


# --- get and delete -------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """Where a `get` or `delete` looks: one key, or every key under a prefix."""

    kind: str
    name: str
    key: str = ""
    prefix: str = ""


def lookup(kind_text: str, name: str) -> Lookup:
    kind = canonical_kind(kind_text)
    if kind in SINGLETON_KEYS:
        expected = SINGLETON_NAMES[kind]
        if name and name != expected:
            raise api.ApiError(f"{kind} {quote(name)} not found; the only one is named {quote(expected)}",
                               "not_found")
        return Lookup(kind, expected, key=SINGLETON_KEYS[kind])
    if len(name) > r.MAX_NAME_LEN:  # never stored, and too long for a KV key
        raise not_found(Lookup(kind, name))
    if name:
        return Lookup(kind, name, key=NAMED_KEYS[kind](name))
    return Lookup(kind, "", prefix=NAMED_KEY_PREFIXES[kind])


def not_found(look: Lookup) -> api.ApiError:
    return api.ApiError(f"{look.kind} {quote(look.name)} not found", "not_found")


def get_result(look: Lookup, values: list[bytes]) -> list[msgspec.Raw]:
    """The stored values `look` found, or the defaults in force for a singleton."""
    if not values and look.key:
        if look.kind in DEFAULTS:
            return [msgspec.Raw(r.encode(DEFAULTS[look.kind]))]
        if look.kind not in SINGLETON_KEYS:
            raise not_found(look)
    return [msgspec.Raw(v) for v in values]


def plan_delete(look: Lookup, exists: bool, actor: str, static: bool = False) -> Change:
    """Deleting a singleton resets it to defaults and succeeds even when it was
    not set (the end state is what the operator asked for); deleting an absent
    role or user is an error, since the name was probably mistyped."""
    if not look.key:
        raise api.ApiError(f"name the {look.kind} to delete: ringfence rm {look.kind}/NAME")
    refuse_static(look.kind, look.key, {look.key} if static else set())
    event: events.AuditEvent
    if look.kind == "network_restrictions":
        message, event = NETWORK_RESTRICTIONS_RESET, events.NetworkRestrictionsReset()
    elif look.kind == "cluster_auth_preference":
        default_mode = r.ClusterAuthPreferenceSpec().locking_mode
        message, event = CAP_RESET, events.CapUpdated(locking_mode=default_mode)
    elif look.kind == "cluster_networking_config":
        message, event = NETWORKING_RESET, events.NetworkingConfigUpdated(client_idle_timeout="")
    elif look.kind == "session_recording_config":
        message, event = RECORDING_RESET, events.RecordingConfigUpdated(mode=r.SessionRecordingConfigSpec().mode)
    elif not exists:
        raise not_found(look)
    elif look.kind == "role":
        message, event = f"role {quote(look.name)} has been deleted", events.RoleDeleted(name=look.name)
    else:
        message, event = f"user {quote(look.name)} has been deleted", events.UserDeleted(name=look.name)
    event.user = actor
    return Change(look.key, None, message, event)


# --- users add / users update ----------------------------------------------------------------


def _same_key(line: str, wanted: str) -> bool:
    """`wanted` names the key `line` holds: the same type and blob, or its SHA256 fingerprint."""
    if wanted.startswith("SHA256:"):
        return line_fingerprint(line) == wanted
    return line.split()[:2] == wanted.split()[:2]


def plan_user_update(request: api.UserUpdateRequest, stored: r.User | None, actor: str) -> Change:
    """`users add` / `users update`: the stored user with only what was asked changed.

    Roles are replaced only with set_roles, keys are added and removed one by one,
    the operator identity is replaced only by a new one: nothing else is dropped."""
    name = request.name
    if stored is None and not request.create:
        raise api.ApiError(f"user {quote(name)} not found; create it with ringfence users add {name}", "not_found")
    user = stored or r.User(metadata=r.Metadata(name=name))
    keys = list(user.spec.ssh_public_keys)
    problems = []
    for wanted in request.remove_keys:
        kept = [line for line in keys if not _same_key(line, wanted)]
        if len(kept) == len(keys):
            shown = wanted if wanted.startswith("SHA256:") else line_fingerprint(wanted) or wanted
            problems.append(f"--remove-key: user {quote(name)} has no key {show(shown)}")
        keys = kept
    keys += [line for line in request.add_keys if not any(_same_key(k, line) for k in keys)]
    spec = msgspec.structs.replace(
        user.spec, ssh_public_keys=keys,
        roles=list(request.set_roles) if request.set_roles is not None else user.spec.roles,
        operator_nkey=request.operator_nkey or user.spec.operator_nkey)
    updated = msgspec.structs.replace(user, spec=spec)
    found, updated = check(updated)
    problems += found
    if problems:
        raise api.ApiError(format_problems(problems))
    verb = "updated" if stored is not None else "created"
    event = (events.UserUpdated if stored is not None else events.UserCreated)(name=name, roles=list(spec.roles))
    event.user = actor
    return Change(names.user_key(name), r.encode(updated), f"user {quote(name)} has been {verb}", event)


# --- settings from the config file (auth_service) -------------------------------------------


def from_config_file(value: bytes | None) -> bool:
    """Whether a stored singleton was written from the policy service's config file."""
    if not value:
        return False
    try:
        res = r.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return getattr(res, "metadata", None) is not None and \
        res.metadata.labels.get(r.ORIGIN_LABEL) == r.ORIGIN_CONFIG_FILE  # type: ignore[union-attr]


def refuse_static(kind: str, key: str, static_keys: set[str]) -> None:
    """`create -f` and `rm` leave a singleton alone while the config file sets it (as the original)."""
    if key in static_keys:
        raise api.ApiError(f"{kind} is set by the policy service's config file ({STATIC_SETTINGS[kind]}): change it "
                           "there and restart the policy service, or remove it there to manage it with "
                           "ringfence create -f", "conflict")


def static_resources(auth: Any) -> dict[str, r.Resource | None]:
    """What the config's auth_service section fixes, by storage key (None: left to create -f)."""
    labels = {r.ORIGIN_LABEL: r.ORIGIN_CONFIG_FILE}
    mode, idle, recording = auth.authentication.locking_mode, auth.client_idle_timeout, auth.session_recording
    return {
        names.CAP_KEY: r.ClusterAuthPreference(
            metadata=r.Metadata(name=r.CAP_NAME, labels=labels),
            spec=r.ClusterAuthPreferenceSpec(locking_mode=mode)) if mode else None,
        names.NETWORKING_KEY: r.ClusterNetworkingConfig(
            metadata=r.Metadata(name=r.NETWORKING_NAME, labels=labels),
            spec=r.ClusterNetworkingConfigSpec(client_idle_timeout=idle)) if idle else None,
        names.RECORDING_CONFIG_KEY: r.SessionRecordingConfig(
            metadata=r.Metadata(name=r.RECORDING_CONFIG_NAME, labels=labels),
            spec=r.SessionRecordingConfigSpec(mode=recording)) if recording else None,
    }


def plan_static(desired: dict[str, r.Resource | None], stored: dict[str, bytes | None]) -> list[Change]:
    """Changes that make the stored singletons what the config file says: written when it sets
    them and they differ, reset to defaults when it no longer sets what it once did."""
    changes = []
    kinds = {key: kind for kind, key in SINGLETON_KEYS.items()}
    for key, res in desired.items():
        current = stored.get(key)
        if res is not None:
            value = r.encode(res)
            if value != current:
                message, event = _created(res, current is not None)
                changes.append(Change(key, value, f"{message} (from the config file)", event))
        elif from_config_file(current):
            change = plan_delete(Lookup(kinds[key], SINGLETON_NAMES[kinds[key]], key=key), True, "")
            changes.append(dataclasses.replace(change, message=f"{change.message} (no longer in the config file)"))
    return changes
