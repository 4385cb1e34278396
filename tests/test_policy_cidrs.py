"""CIDR syntax accepted in network_restrictions, and the form stored."""

from __future__ import annotations

import pytest

from services.policy.cidrs import normalise_cidr


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("192.168.1.7/32", "192.168.1.7/32"),
        ("10.1.2.3", "10.1.2.3/32"),  # bare IPv4 means /32
        ("10.0.0.1/8", "10.0.0.0/8"),  # host bits set: the network, as net.ParseCIDR gives
        ("fe80::/10", "fe80::/10"),
        ("::1/128", "::1/128"),
        ("::/0", "::/0"),
        ("2001:db8::1", "2001:db8::1/128"),  # bare IPv6 means /128
        ("2001:DB8::1/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),  # IPv4-mapped: stored as the IPv4 rule it equals
        ("::ffff:192.168.1.1", "192.168.1.1/32"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("::ffff:0:0/80", "::/80"),  # wider than the mapped range: stays IPv6
    ],
)
def test_valid_cidrs_are_stored_normalised(written, stored):
    assert normalise_cidr(written) == stored


@pytest.mark.parametrize(
    "written",
    [
        "",
        "10.0.0.0/33",
        "300.1.1.1",
        "fe80::/129",
        "10.0.0.0/",
        "/8",
        "10.0.0.0/8/8",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "10.0.0.0/255.0.0.0",  # netmask form: Go's ParseCIDR rejects it, so do we
        "10.0.0.0/0.255.255.255",
        " 10.0.0.0/8",
        "10.0.0.0/8 ",
        "fe80::1%eth0",
        "fe80::%eth0/64",
        "010.0.0.1",  # leading zeros are ambiguous (octal in some parsers)
        "10.0.0",
        "example.com",
        "1.2.3.4/1000",
    ],
)
def test_invalid_cidrs_are_rejected(written):
    with pytest.raises(ValueError):
        normalise_cidr(written)
