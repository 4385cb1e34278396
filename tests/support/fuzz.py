"""Hypothesis strategies shared by the fuzz tests: random JSON values, near-valid
resource documents (a valid template with one part replaced), nasty strings."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

# Strings that sit near the edge of what the parsers accept.
EDGE_STRINGS = [
    "", " ", "\t", "\n", "\x00", "\x7f", "\u2028", "\ufeff", "é", "🔥", "a" * 300, "../..", "a/b", "a..b", ".a",
    "*", ">", "ringfence.api.policy.create", "10.0.0.0/33", "10.0.0.0/8", "10.0.0.1/8", "::1/129", "fe80::1%eth0",
    "::ffff:10.0.0.0/104", "::ffff:0:0/96", "0.0.0.0/0", "::/0", " 10.0.0.0/8", "10.0.0.0/255.0.0.0", "1.2.3.4/032",
    "01.2.3.4", "1.2.3", "256.0.0.1", "10.0.0.0/", "/8", "15m", "1h30m", "0", "0s", "-1s", "1e9s", "99999999999h",
    "1.5h", "ms", "9" * 400 + "s", "\u0661s", "2030-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59", "2021-02-30T00:00:00Z", "2021-01-01T25:00:00Z", "2021-01-01T00:00:00",
    "2030-01-01 00:00:00.123456789+01:00", "strict", "best_effort", "v4", "v5", "v2", "role", "lock", "user",
    "network_restrictions", "cluster_auth_preference", "cluster_networking_config", "list", "*",
    "ssh-ed25519 AAAA", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAA x", "U" * 56,
]

edge_strings = st.sampled_from(EDGE_STRINGS)
texts = st.text(max_size=40) | edge_strings
big_ints = st.integers() | st.sampled_from([-(2**63), 2**63 - 1, 2**63, 2**64, -(2**64), 10**30, -1, 0])
scalars = st.none() | st.booleans() | big_ints | st.floats() | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)

NETPOL = {
    "kind": "network_restrictions",
    "version": "v4",
    "metadata": {"name": "network-restrictions"},
    "spec": {"allow": [{"cidr": "10.0.0.0/8"}, {"cidr": "fe80::/10"}], "deny": [{"cidr": "10.1.2.3"}]},
}
ROLE = {
    "kind": "role",
    "version": "v5",
    "metadata": {"name": "dev", "description": "developers", "labels": {"team": "a"}},
    "spec": {
        "allow": {"rules": [{"resources": ["lock"], "verbs": ["list", "read"]}], "logins": ["ubuntu"]},
        "deny": {"logins": ["root"]},
        "options": {"lock": "strict", "max_connections": 2, "max_sessions": 3, "client_idle_timeout": "15m"},
    },
}
USER = {
    "kind": "user",
    "version": "v2",
    "metadata": {"name": "alice@example.com"},
    "spec": {"roles": ["dev"], "ssh_public_keys": [], "operator_nkey": ""},
}
CAP = {"kind": "cluster_auth_preference", "version": "v2", "metadata": {"name": "cluster-auth-preference"},
       "spec": {"locking_mode": "strict"}}
NETWORKING = {"kind": "cluster_networking_config", "version": "v2",
              "metadata": {"name": "cluster-networking-config"}, "spec": {"client_idle_timeout": "15m"}}
LOCK = {
    "kind": "lock",
    "version": "v2",
    "metadata": {"name": "maintenance-1"},
    "spec": {"target": {"user": "bob", "login": "root"}, "message": "maintenance", "expires": "2099-01-01T00:00:00Z"},
}
POLICY_TEMPLATES = [NETPOL, ROLE, USER, CAP, NETWORKING]
TEMPLATES = [*POLICY_TEMPLATES, LOCK]


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into `doc`, containers included (the root is ())."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    out = copy.deepcopy(doc)
    cur = out
    for step in path[:-1]:
        cur = cur[step]
    if delete:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return out


@st.composite
def mutated(draw, templates=TEMPLATES) -> Any:
    """A valid document with one to three parts replaced, removed or added."""
    doc = copy.deepcopy(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if how == "delete" and path:
            doc = _set(doc, path, None, delete=True)
        elif how == "add" and isinstance(_get(doc, path), dict):
            doc = _set(doc, (*path, draw(texts)), draw(json_values))
        else:
            doc = _set(doc, path, draw(json_values | texts))
    return doc


def _get(doc: Any, path: tuple) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def cidr_like() -> st.SearchStrategy[str]:
    """Strings that look like CIDRs, valid or not."""
    addr = st.ip_addresses().map(str) | st.from_regex(r"[0-9a-fA-F:.%]{0,42}", fullmatch=True)
    prefix = st.none() | st.integers(-1, 200).map(str) | st.from_regex(r"[0-9 +.x]{0,5}", fullmatch=True)
    return st.builds(lambda a, p: a if p is None else f"{a}/{p}", addr, prefix) | texts


documents = mutated() | json_values
