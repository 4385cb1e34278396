"""CIDR syntax for network_restrictions: what we accept and the one form we store.

Accepted: `a.b.c.d/n` (n 0-32), an IPv6 address with `/n` (n 0-128), or a bare
address meaning /32 or /128. Host bits may be set (`10.0.0.1/8`): like the
original, which parsed with Go's net.ParseCIDR and kept only the network, we
accept it and store the network (`10.0.0.0/8`), so every consumer sees one
canonical form.

Rejected on purpose, although Python's ipaddress would take them: netmask and
hostmask forms (`10.0.0.0/255.0.0.0`), IPv6 zones (`fe80::1%eth0`, a zone
means nothing outside one host) and surrounding whitespace. Go rejects these
too, so YAML written for the original means the same thing here.
"""

from __future__ import annotations

import ipaddress
import re

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_PREFIX = re.compile(r"[0-9]{1,3}")
_MAPPED_PREFIX = 96  # ::ffff:0:0/96 holds the IPv4-mapped addresses


def parse_cidr(text: str) -> Network:
    """The network `text` denotes; ValueError when it is not a CIDR we accept."""
    addr_text, slash, prefix_text = text.partition("/")
    if not addr_text or "%" in addr_text or addr_text != addr_text.strip():
        raise ValueError(text)
    addr = ipaddress.ip_address(addr_text)  # ValueError on anything else
    if slash:
        if not _PREFIX.fullmatch(prefix_text):
            raise ValueError(text)
        prefix = int(prefix_text)
    else:
        prefix = addr.max_prefixlen
    if prefix > addr.max_prefixlen:
        raise ValueError(text)
    network = ipaddress.ip_network((addr, prefix), strict=False)
    return _unmap(network)


def _unmap(network: Network) -> Network:
    """`::ffff:10.0.0.0/104` is stored as `10.0.0.0/8`.

    IPv4 rules already apply to IPv4-mapped IPv6 destinations, so both forms
    block and allow exactly the same connections; keeping only the IPv4 form
    gives the enforcer one representation. Prefixes shorter than /96 reach
    beyond the mapped range and stay IPv6.
    """
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= _MAPPED_PREFIX:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - _MAPPED_PREFIX))
    return network


def normalise_cidr(text: str) -> str:
    """The canonical string we store for `text`; ValueError when invalid."""
    return str(parse_cidr(text))
