"""The enforcer's policy core: effective entries and safe update ordering."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.enforcer.policy_core import ALLOW, DENY, allowed, effective_entries, parse_cidr, plan_update

# A tiny IPv4 space (10.0.0.0/27) so every address can be checked.
SPACE = [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.0.0.0")) + i)) for i in range(32)]


def reference_allowed(allow: list[str], deny: list[str], address: str) -> bool:
    """reference.md: inside an allow CIDR and not inside any deny CIDR."""
    addr = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    inside = lambda cidrs: any(addr in parse_cidr(c) for c in cidrs if parse_cidr(c).version == addr.version)  # noqa: E731
    return inside(allow) and not inside(deny)


cidr = st.builds(lambda a, p: f"10.0.0.{a}/{p}", st.integers(0, 31), st.integers(27, 32))
policy = st.tuples(st.lists(cidr, max_size=6), st.lists(cidr, max_size=6))


@settings(max_examples=400, deadline=None)
@given(policy)
def test_effective_entries_decide_like_the_reference(p):
    allow, deny = p
    entries = effective_entries(allow, deny)
    for address in SPACE:
        assert allowed(entries, address) == reference_allowed(allow, deny, address), (allow, deny, address)


@settings(max_examples=600, deadline=None)
@given(policy, policy)
def test_every_prefix_of_an_update_gives_each_address_its_old_or_new_decision(old_p, new_p):
    """So an update never opens what both deny, nor blocks what both allow."""
    old, new = effective_entries(*old_p), effective_entries(*new_p)
    state = dict(old)
    states = [dict(state)]
    for step in plan_update(old, new):
        if step.op == "put":
            state[step.key] = step.verdict
        else:
            del state[step.key]
        states.append(dict(state))
    assert state == new
    for s in states:
        for address in SPACE:
            assert allowed(s, address) in (allowed(old, address), allowed(new, address)), (old_p, new_p, address)


@pytest.mark.parametrize(
    ("allow", "deny", "address", "expected"),
    [
        (["10.0.0.0/8"], [], "10.1.2.3", True),
        (["10.0.0.0/8"], ["10.1.2.3"], "10.1.2.3", False),  # deny carves out of allow
        (["10.0.0.0/8"], ["10.1.2.3"], "10.1.2.4", True),
        (["10.1.0.0/16"], ["10.0.0.0/8"], "10.1.2.3", False),  # a wider deny beats a narrower allow
        ([], [], "10.1.2.3", False),  # deny-all once a resource exists
        (["10.0.0.0/8"], [], "::ffff:10.1.2.3", True),  # IPv4 rules apply to IPv4-mapped
        (["10.0.0.0/8"], ["10.1.2.3"], "::ffff:10.1.2.3", False),
        (["::ffff:10.0.0.0/104"], [], "10.9.9.9", True),  # an IPv4-mapped rule is the IPv4 rule
        (["fe80::/10"], [], "fe80::1", True),
        (["::/0"], ["fe80::1"], "fe80::1", False),
        (["::1"], [], "::1", True),  # bare address means /128
        (["::1"], [], "::2", False),
        (["127.0.0.1"], [], "127.0.0.2", False),  # bare address means /32
        (["0.0.0.0/0"], [], "::1", False),  # IPv4 rules do not allow IPv6
    ],
)
def test_decisions(allow, deny, address, expected):
    assert allowed(effective_entries(allow, deny), address) is expected


def test_allow_inside_deny_is_not_stored_and_host_bits_are_cleared():
    entries = effective_entries(["10.1.0.0/16", "192.168.1.7/24"], ["10.0.0.0/8"])
    verdicts = {(bytes(k[1]), k[2]): v for k, v in entries.items()}
    assert verdicts == {
        (bytes([192, 168, 1, 0]), 24): ALLOW,
        (bytes([10, 0, 0, 0]), 8): DENY,
    }


def test_plan_is_empty_when_nothing_changes():
    e = effective_entries(["10.0.0.0/8"], ["10.1.2.3"])
    assert plan_update(e, dict(e)) == []
