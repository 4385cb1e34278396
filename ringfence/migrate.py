"""The original's exported resources (`tctl get all`) as Ringfence documents. Pure.

`ringfence import` sends what this returns through the same requests as
`create -f`, so the owning services check every document as usual. Nothing
is dropped silently: each document's fields that do not carry over are named
in a note, and each document not imported is counted in `skipped` with why.

What carries over, and how:

- role v3-v7: options lock, max_connections, max_sessions, client_idle_timeout;
  allow/deny rules on the resources Ringfence has (readnosecrets reads);
  logins (kept for reference: sshd decides which logins a key may use). An
  allow rule with `where` or `actions` is left out (granting less); a deny
  rule keeps denying without them (denying more).
- user: roles. A user Ringfence already has keeps its SSH keys, operator
  identity and roles (the import adds roles, it never takes any away).
- lock: target, message, expires. Targets that can never match here (an
  access request, a Windows desktop, a device named by the original's device
  ID) are left out of the target; a lock left with none is skipped.
- network_restrictions: as it is (the same resource).
- cluster_auth_preference, cluster_networking_config, session_recording_config:
  the settings Ringfence has, unless the original took them from its config
  file or its defaults (set those in the config file: ringfence/teleport_yaml.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .contract import resources as r
from .contract.documents import quote
from .teleport_yaml import RECORDING_MODES

ROLE_VERSIONS = ("v3", "v4", "v5", "v6", "v7")
# Resources a role rule can name that mean something here (runtime/operator_auth.py checks them).
RESOURCES = frozenset({"*", "role", "user", "lock", "session", "event", "network_restrictions",
                       "cluster_auth_preference", "cluster_networking_config", "session_recording_config"})
VERBS = {"*": "*", "list": "list", "create": "create", "read": "read", "update": "update", "delete": "delete",
         "readnosecrets": "read"}
ROLE_OPTIONS = ("lock", "max_connections", "max_sessions", "client_idle_timeout")
NO_DURATION = ("", "0", "0s", "never")
ORIGIN_LABEL = "teleport.dev/origin"  # the original's: defaults, config-file or dynamic
# Metadata the original's backend keeps for itself: not data.
BOOKKEEPING = ("id", "revision", "namespace")
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")

# Kinds not imported, and why.
OTHER_KINDS = {
    "cert_authority": "sshd trusts user certificates through TrustedUserCAKeys",
    "github": "sshd authenticates users; Ringfence has no login connectors",
    "oidc": "sshd authenticates users; Ringfence has no login connectors",
    "saml": "sshd authenticates users; Ringfence has no login connectors",
    "token": "nodes join through NATS credentials",
    "node": "nodes are the hosts running an enforcer",
    "trusted_cluster": "Ringfence has one cluster",
    "remote_cluster": "Ringfence has one cluster",
    "cluster_name": "cluster_name is set in the config file",
    "namespace": "Ringfence has no namespaces",
}
OTHER_KIND_REASON = "Ringfence controls OpenSSH sessions only"


@dataclass
class Translation:
    docs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (position in the stream, document)
    notes: list[str] = field(default_factory=list)  # what did not carry over, per document
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> documents not imported


def _label(doc: dict[str, Any]) -> str:
    name = (doc.get("metadata") or {}).get("name")
    kind = str(doc.get("kind", "?"))
    return f"{kind} {quote(name)}" if isinstance(name, str) else kind


def _present(value: Any) -> bool:
    return value not in (None, "", [], {}, False, 0, "0001-01-01T00:00:00Z")


def _leftovers(section: Any, taken: tuple[str, ...], path: str) -> list[str]:
    """The paths of `section`'s keys that are set and not among `taken`."""
    if not isinstance(section, dict):
        return []
    return [f"{path}.{key}" for key, value in section.items() if key not in taken and _present(value)]


def _metadata(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    md = dict(doc.get("metadata") or {})
    for key in BOOKKEEPING:
        md.pop(key, None)
    labels = {k: v for k, v in (md.get("labels") or {}).items() if k != ORIGIN_LABEL}
    if labels:
        md["labels"] = labels
    else:
        md.pop("labels", None)
    if _present(md.pop("expires", None)):
        dropped.append("metadata.expires")
    return md


def _rules(rules: Any, path: str, allow: bool, dropped: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, dict):
            continue
        conditional = [k for k in ("where", "actions") if _present(rule.get(k))]
        if conditional and allow:  # granting without the condition would grant more
            dropped.append(f"{path}[{i}] (has {', '.join(conditional)})")
            continue
        dropped += [f"{path}[{i}].{k}" for k in conditional]
        resources = [x for x in rule.get("resources") or [] if x in RESOURCES]
        verbs = list(dict.fromkeys(VERBS[v] for v in rule.get("verbs") or [] if v in VERBS))
        other = [str(x) for x in rule.get("resources") or [] if x not in RESOURCES]
        other += [f"verb {v}" for v in rule.get("verbs") or [] if v not in VERBS]
        if other:
            dropped.append(f"{path}[{i}] ({', '.join(other)})")
        if resources and verbs:
            out.append({"resources": resources, "verbs": verbs})
    return out


def _role(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any] | None:
    version = doc.get("version")
    if version not in ROLE_VERSIONS:
        return None
    spec = doc.get("spec") or {}
    options = spec.get("options") or {}
    mapped_options = {k: options[k] for k in ROLE_OPTIONS if _present(options.get(k))}
    if str(mapped_options.get("client_idle_timeout", "")) in NO_DURATION:
        mapped_options.pop("client_idle_timeout", None)
    dropped += _leftovers(options, ROLE_OPTIONS, "spec.options")
    out_spec: dict[str, Any] = {"options": mapped_options}
    for side in ("allow", "deny"):
        cond = spec.get(side) or {}
        rules = _rules(cond.get("rules"), f"spec.{side}.rules", side == "allow", dropped)
        logins = [x for x in cond.get("logins") or [] if isinstance(x, str) and x.strip()]
        out_spec[side] = {k: v for k, v in (("rules", rules), ("logins", logins)) if v}
        dropped += _leftovers(cond, ("rules", "logins"), f"spec.{side}")
    dropped += _leftovers(spec, ("options", "allow", "deny"), "spec")
    return {"kind": "role", "version": version if version in ("v5", "v6", "v7") else "v5",
            "metadata": _metadata(doc, dropped), "spec": out_spec}


def _user(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    status = spec.get("status") or {}
    if status.get("is_locked"):
        dropped.append("spec.status.is_locked (locked in the original after failed logins)")
    dropped += _leftovers(spec, ("roles", "status", "created_by", "expires"), "spec")
    roles = [x for x in spec.get("roles") or [] if isinstance(x, str)]
    return {"kind": "user", "version": "v2", "metadata": _metadata(doc, dropped), "spec": {"roles": roles}}


def lock_target(target: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The target fields that can match something here, and the ones left out (why, by path)."""
    kept, left_out = {}, []
    for key, value in target.items():
        if key in ("access_request", "windows_desktop"):
            left_out.append(f"spec.target.{key} (nothing here has one)")
        elif key in ("device", "mfa_device") and not (isinstance(value, str) and _FINGERPRINT.fullmatch(value)):
            left_out.append(f"spec.target.{key} (the original's device ID; Ringfence locks keys by SHA256 "
                            "fingerprint)")
        else:
            kept[key] = value
    return kept, left_out


def _lock(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any] | None:
    spec = doc.get("spec") or {}
    target, left_out = lock_target(spec.get("target") or {})
    dropped += left_out
    if not target:
        return None
    dropped += _leftovers(spec, ("target", "message", "expires", "created_at", "created_by"), "spec")
    out_spec = {"target": target, **{k: spec[k] for k in ("message", "expires") if _present(spec.get(k))}}
    return {"kind": "lock", "version": "v2", "metadata": _metadata(doc, dropped), "spec": out_spec}


def _setting(doc: dict[str, Any], taken: dict[str, Any], dropped: list[str]) -> dict[str, Any] | None:
    spec = doc.get("spec") or {}
    dropped += _leftovers(spec, tuple(taken), "spec")
    if not taken:
        return None
    return {"kind": doc["kind"], "version": "v2", "metadata": _metadata(doc, dropped), "spec": taken}


def _cap(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any] | None:
    spec = doc.get("spec") or {}
    return _setting(doc, {"locking_mode": spec["locking_mode"]} if spec.get("locking_mode") else {}, dropped)


def _networking(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any] | None:
    idle = str((doc.get("spec") or {}).get("client_idle_timeout") or "")
    return _setting(doc, {} if idle in NO_DURATION else {"client_idle_timeout": idle}, dropped)


def _recording(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any] | None:
    mode = (doc.get("spec") or {}).get("mode")
    if mode in RECORDING_MODES and RECORDING_MODES[mode] != mode:
        dropped.append(f'spec.mode "{mode}" (recorded on the node: "{RECORDING_MODES[mode]}")')
    return _setting(doc, {"mode": RECORDING_MODES.get(mode, mode)} if mode else {}, dropped)


def _network_restrictions(doc: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    dropped += _leftovers(spec, ("allow", "deny"), "spec")
    return {"kind": "network_restrictions", "version": doc.get("version", "v4"), "metadata": _metadata(doc, dropped),
            "spec": {k: spec[k] for k in ("allow", "deny") if k in spec}}


TRANSLATORS = {
    "role": _role, "user": _user, "lock": _lock, "network_restrictions": _network_restrictions,
    "cluster_auth_preference": _cap, "cluster_networking_config": _networking,
    "session_recording_config": _recording,
}
SETTINGS = ("cluster_auth_preference", "cluster_networking_config", "session_recording_config")


def translate(docs: list[tuple[int, Any]]) -> Translation:
    """Each (position, document) of an exported stream, as Ringfence would store it."""
    out = Translation()
    for position, doc in docs:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        label = f"document {position} ({_label(doc)})" if isinstance(doc, dict) else f"document {position}"
        translator = TRANSLATORS.get(kind) if isinstance(kind, str) else None
        if translator is None:
            reason = OTHER_KINDS.get(kind, OTHER_KIND_REASON) if isinstance(kind, str) else "it has no kind"
            out.skipped.setdefault(f"{kind}: {reason}", []).append(label)
            continue
        origin = ((doc.get("metadata") or {}).get("labels") or {}).get(ORIGIN_LABEL)
        if kind in SETTINGS and origin in ("config-file", "defaults"):
            where = "the original's config file: set it in Ringfence's (auth_service)" if origin == "config-file" \
                else "the original's defaults"
            out.skipped.setdefault(f"{kind}: it came from {where}", []).append(label)
            continue
        dropped: list[str] = []
        translated = translator(doc, dropped)
        if translated is None:
            why = {"role": f"role version {doc.get('version')!r} (v3-v7 are imported)",
                   "lock": "no target of it can match anything here"}.get(kind, "nothing in it applies here")
            out.skipped.setdefault(f"{kind}: {why}", []).append(label)
        else:
            out.docs.append((position, translated))
        if dropped:
            out.notes.append(f"{label}: not carried over: {', '.join(dropped)}")
    return out


def merge_existing_users(docs: list[tuple[int, dict[str, Any]]], existing: dict[str, r.User]) -> list[str]:
    """Users Ringfence has keep their keys, operator identity and roles (the import only adds roles);
    returns a note per user so merged."""
    notes = []
    for position, doc in docs:
        if doc.get("kind") != "user" or (user := existing.get(doc["metadata"].get("name"))) is None:
            continue
        spec = doc["spec"]
        kept = [role for role in user.spec.roles if role not in spec["roles"]]
        spec["roles"] = spec["roles"] + kept
        if user.spec.ssh_public_keys:
            spec["ssh_public_keys"] = list(user.spec.ssh_public_keys)
        if user.spec.operator_nkey:
            spec["operator_nkey"] = user.spec.operator_nkey
        what = [f"roles {', '.join(kept)}"] if kept else []
        what += ["SSH keys"] if user.spec.ssh_public_keys else []
        what += ["operator identity"] if user.spec.operator_nkey else []
        if what:
            notes.append(f"document {position} (user {quote(user.metadata.name)}): kept its Ringfence "
                         f"{', '.join(what)}")
    return notes
