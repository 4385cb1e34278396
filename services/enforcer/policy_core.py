"""Turning a network_restrictions resource into BPF trie entries, and a policy
change into an update sequence that is never more permissive than the old or
the new policy. Pure: no I/O.

Semantics (reference.md): a destination is allowed only when it is inside an
`allow` CIDR and not inside any `deny` CIDR.

The BPF program decides with ONE longest-prefix lookup per destination, so the
trie holds *effective* entries:
  - every deny CIDR, with verdict DENY;
  - every allow CIDR that is not inside some deny CIDR, with verdict ALLOW.
The longest match for an address is then DENY whenever any deny CIDR covers it
(a covering allow is either less specific than that deny, or was dropped for
being inside it) and ALLOW when only allow CIDRs cover it. No match: denied.

Updates are applied entry by entry, and each single-entry update is atomic for
the BPF lookup. `plan_update` orders them so that after ANY prefix of the
sequence every address gets either its old or its new decision:
  1. write new entries (inserts and verdict changes), most specific first;
  2. delete entries the new policy does not have, least specific first.
In step 1, an address whose longest match becomes the entry just written
already has every more specific new entry in place, so the match is its new
longest match. In step 2, an address that loses its match falls back to a less
specific entry; every less specific old-only entry is already gone, so that is
its new longest match. Hence an update never opens what both policies deny and
never blocks what both allow. tests/test_policy_core.py checks this
exhaustively on a small address space.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

ALLOW = 1
DENY = 2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# (family, network bytes, prefix length): the trie key.
Key = tuple[int, bytes, int]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_cidr(text: str) -> Network:
    """A CIDR or bare address (meaning /32 or /128). Host bits are cleared, as
    the original's net.ParseCIDR did. The policy service has validated it."""
    net = ipaddress.ip_network(text.strip(), strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        # IPv4-mapped destinations are judged by IPv4 rules, so an IPv4-mapped
        # rule is stored as the IPv4 rule it means.
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def key_of(net: Network) -> Key:
    return (net.version, net.network_address.packed, net.prefixlen)


def _covered_by(net: Network, deny_by_family: dict[int, set[Key]], deny_lengths: dict[int, list[int]]) -> bool:
    """Is `net` inside some deny CIDR? One set lookup per distinct deny length."""
    bits = net.max_prefixlen
    addr = int(net.network_address)
    for length in deny_lengths.get(net.version, ()):
        if length > net.prefixlen:
            break
        masked = addr >> (bits - length) << (bits - length) if length else 0
        if (net.version, masked.to_bytes(bits // 8, "big"), length) in deny_by_family[net.version]:
            return True
    return False


def effective_entries(allow: Iterable[str], deny: Iterable[str]) -> dict[Key, int]:
    deny_nets = [parse_cidr(c) for c in deny]
    deny_keys: dict[int, set[Key]] = {4: set(), 6: set()}
    for n in deny_nets:
        deny_keys[n.version].add(key_of(n))
    deny_lengths = {fam: sorted({k[2] for k in keys}) for fam, keys in deny_keys.items()}

    entries: dict[Key, int] = {}
    for text in allow:
        net = parse_cidr(text)
        if not _covered_by(net, deny_keys, deny_lengths):
            entries[key_of(net)] = ALLOW
    for fam_keys in deny_keys.values():
        for k in fam_keys:
            entries[k] = DENY
    return entries


@dataclass(frozen=True)
class Step:
    op: Literal["put", "delete"]
    key: Key
    verdict: int = 0


def plan_update(old: dict[Key, int], new: dict[Key, int]) -> list[Step]:
    """The update sequence from `old` to `new`; safe at every prefix (see module doc)."""
    puts = sorted((k for k, v in new.items() if old.get(k) != v), key=lambda k: -k[2])
    deletes = sorted((k for k in old if k not in new), key=lambda k: k[2])
    return [Step("put", k, new[k]) for k in puts] + [Step("delete", k) for k in deletes]


def lookup(entries: dict[Key, int], address: str) -> int | None:
    """Longest-prefix match, as the kernel does it (for tests and diagnostics)."""
    addr = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    bits = addr.max_prefixlen
    value = int(addr)
    for length in range(bits, -1, -1):
        masked = value >> (bits - length) << (bits - length) if length else 0
        verdict = entries.get((addr.version, masked.to_bytes(bits // 8, "big"), length))
        if verdict is not None:
            return verdict
    return None


def allowed(entries: dict[Key, int], address: str) -> bool:
    return lookup(entries, address) == ALLOW
