"""Semantic checks, one function per kind, run after strict decoding.

Each check returns the problems it found (`path: "value" ...`, the same shape
strict decoding uses) and the resource in the form we store: CIDRs are
normalised, nothing else is rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from ringfence.contract import resources as r
from ringfence.contract.documents import show
from ringfence.durations import parse_duration

from .cidrs import normalise_cidr
from .credentials import is_openssh_public_key, is_public_user_nkey

VERBS = ("list", "create", "read", "update", "delete", "*")

# Names end up in messages, audit events and `KIND/NAME` arguments: no
# whitespace or control characters, and no "/" so `roles/NAME` is unambiguous.
_NAME = re.compile(r"[^\s/\x00-\x1f\x7f]+")


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, text: str) -> None:
        self.items.append(f"{path}: {text}")

    def count_at_most(self, path: str, items: list, limit: int) -> None:
        if len(items) > limit:
            self.add(path, f"{len(items)} entries; at most {limit} are allowed")


def check_name(p: Problems, name: str, path: str = "metadata.name") -> None:
    if len(name) > r.MAX_NAME_LEN or not _NAME.fullmatch(name):
        p.add(path, f'{show(name)} is not a valid name: use 1-{r.MAX_NAME_LEN} characters '
                    'without spaces, "/" or control characters')


def check_fixed_name(p: Problems, name: str, expected: str) -> None:
    """Singletons (one per cluster) have one fixed name, as in the original."""
    if name != expected:
        p.add("metadata.name", f'{show(name)}: must be "{expected}" (there is one per cluster)')


def check_metadata(p: Problems, md: r.Metadata) -> None:
    if len(md.description) > r.MAX_MESSAGE_LEN:
        p.add("metadata.description", f"{len(md.description)} characters; at most {r.MAX_MESSAGE_LEN} are allowed")
    if len(md.labels) > r.MAX_LIST_ITEMS:
        p.add("metadata.labels", f"{len(md.labels)} entries; at most {r.MAX_LIST_ITEMS} are allowed")
    if r.ORIGIN_LABEL in md.labels:
        p.add(f"metadata.labels.{r.ORIGIN_LABEL}", "is set by the policy service only (for settings from its "
                                                   "config file); leave it out")


def check_duration(p: Problems, text: str, path: str) -> None:
    try:
        parse_duration(text)
    except ValueError as exc:
        p.add(path, str(exc))


# --- one function per kind ----------------------------------------------------------


def check_network_restrictions(p: Problems, res: r.NetworkRestrictions) -> r.NetworkRestrictions:
    check_fixed_name(p, res.metadata.name, r.NETWORK_RESTRICTIONS_NAME)
    lists: dict[str, list[r.CIDRRule]] = {}
    for list_name in ("allow", "deny"):
        rules: list[r.CIDRRule] = getattr(res.spec, list_name)
        path = f"spec.{list_name}"
        if len(rules) > r.MAX_CIDRS_PER_LIST:
            # Checking every entry of an oversized list would only bury this line.
            p.count_at_most(path, rules, r.MAX_CIDRS_PER_LIST)
            lists[list_name] = rules
            continue
        normalised = []
        for i, rule in enumerate(rules):
            try:
                normalised.append(r.CIDRRule(cidr=normalise_cidr(rule.cidr)))
            except ValueError:
                p.add(f"{path}[{i}].cidr", f"{show(rule.cidr)} is not a valid CIDR")
        lists[list_name] = normalised
    spec = r.NetworkRestrictionsSpec(allow=lists["allow"], deny=lists["deny"])
    return msgspec.structs.replace(res, spec=spec)


def _check_conditions(p: Problems, cond: r.RoleConditions, path: str) -> None:
    p.count_at_most(f"{path}.rules", cond.rules, r.MAX_LIST_ITEMS)
    for i, rule in enumerate(cond.rules[: r.MAX_LIST_ITEMS]):
        rpath = f"{path}.rules[{i}]"
        if not rule.resources:
            p.add(f"{rpath}.resources", "must name at least one resource")
        for j, res_name in enumerate(rule.resources):
            if not res_name.strip():
                p.add(f"{rpath}.resources[{j}]", f"{show(res_name)} is not a resource name")
        if not rule.verbs:
            p.add(f"{rpath}.verbs", "must name at least one verb")
        for j, verb in enumerate(rule.verbs):
            if verb not in VERBS:
                p.add(f"{rpath}.verbs[{j}]", f"{show(verb)} is not a verb; use one of {', '.join(VERBS)}")
    p.count_at_most(f"{path}.logins", cond.logins, r.MAX_LIST_ITEMS)
    for i, login in enumerate(cond.logins):
        if not login.strip():
            p.add(f"{path}.logins[{i}]", f"{show(login)} is not a login")


def check_role(p: Problems, res: r.Role) -> r.Role:
    check_name(p, res.metadata.name)
    _check_conditions(p, res.spec.allow, "spec.allow")
    _check_conditions(p, res.spec.deny, "spec.deny")
    opts = res.spec.options
    # `lock` needs no check here: strict decoding admits only strict/best_effort.
    for field in ("max_connections", "max_sessions"):
        value = getattr(opts, field)
        if value < 0:
            p.add(f"spec.options.{field}", f"{value}: must be 0 (no limit) or more")
    if opts.client_idle_timeout:
        check_duration(p, opts.client_idle_timeout, "spec.options.client_idle_timeout")
    return res


def check_user(p: Problems, res: r.User) -> r.User:
    check_name(p, res.metadata.name)
    spec = res.spec
    p.count_at_most("spec.roles", spec.roles, r.MAX_LIST_ITEMS)
    for i, role in enumerate(spec.roles[: r.MAX_LIST_ITEMS]):
        check_name(p, role, f"spec.roles[{i}]")
    p.count_at_most("spec.ssh_public_keys", spec.ssh_public_keys, r.MAX_LIST_ITEMS)
    for i, key in enumerate(spec.ssh_public_keys[: r.MAX_LIST_ITEMS]):
        if not is_openssh_public_key(key):
            p.add(f"spec.ssh_public_keys[{i}]",
                  f'{show(key)} is not an OpenSSH public key (expected "<type> <base64> [comment]")')
    if spec.operator_nkey and not is_public_user_nkey(spec.operator_nkey):
        p.add("spec.operator_nkey", f"{show(spec.operator_nkey)} is not a public user nkey (56 characters, U...)")
    return res


def check_cap(p: Problems, res: r.ClusterAuthPreference) -> r.ClusterAuthPreference:
    check_fixed_name(p, res.metadata.name, r.CAP_NAME)
    return res


def check_networking(p: Problems, res: r.ClusterNetworkingConfig) -> r.ClusterNetworkingConfig:
    check_fixed_name(p, res.metadata.name, r.NETWORKING_NAME)
    if res.spec.client_idle_timeout:
        check_duration(p, res.spec.client_idle_timeout, "spec.client_idle_timeout")
    return res


def check_recording_config(p: Problems, res: r.SessionRecordingConfig) -> r.SessionRecordingConfig:
    check_fixed_name(p, res.metadata.name, r.RECORDING_CONFIG_NAME)
    return res


CHECKS: dict[type, Callable[[Problems, Any], Any]] = {
    r.NetworkRestrictions: check_network_restrictions,
    r.Role: check_role,
    r.User: check_user,
    r.ClusterAuthPreference: check_cap,
    r.ClusterNetworkingConfig: check_networking,
    r.SessionRecordingConfig: check_recording_config,
}


def check(res: r.Resource) -> tuple[list[str], r.Resource]:
    """Problems with `res` (empty when fine) and the form to store."""
    p = Problems()
    checker = CHECKS.get(type(res))
    if checker is None:
        kind = res.__struct_config__.tag
        return [f'kind "{kind}" is served by the locks service, not the policy service'], res
    check_metadata(p, res.metadata)  # type: ignore[attr-defined]
    stored = checker(p, res)
    return p.items, stored
