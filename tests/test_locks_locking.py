"""ringfence.locking: expiry, matching and the message users see, table-driven."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from ringfence import locking
from ringfence.contract import api
from ringfence.contract import resources as r

NOW = dt.datetime(2021, 8, 14, 12, 0, 0, tzinfo=dt.UTC)


def lock(message: str = "", expires: str = "", name: str = "l", **target: str) -> r.Lock:
    return r.Lock(metadata=r.Metadata(name=name),
                  spec=r.LockSpec(target=r.LockTarget(**target), message=message, expires=expires))


# --- times ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2021-08-14T22:27:00Z", dt.datetime(2021, 8, 14, 22, 27, tzinfo=dt.UTC)),
    ("2021-08-14t22:27:00z", dt.datetime(2021, 8, 14, 22, 27, tzinfo=dt.UTC)),
    ("2021-08-14 22:27:00Z", dt.datetime(2021, 8, 14, 22, 27, tzinfo=dt.UTC)),
    ("2021-08-15T00:27:00+02:00", dt.datetime(2021, 8, 14, 22, 27, tzinfo=dt.UTC)),
    ("2021-08-14T22:27:00.5Z", dt.datetime(2021, 8, 14, 22, 27, 0, 500000, tzinfo=dt.UTC)),
    ("2021-08-14T22:27:00.123456789Z", dt.datetime(2021, 8, 14, 22, 27, 0, 123456, tzinfo=dt.UTC)),
    ("2021-08-14T17:27:00-05:00", dt.datetime(2021, 8, 14, 22, 27, tzinfo=dt.UTC)),
])
def test_parse_time_accepts_rfc3339(text, expected):
    parsed = locking.parse_time(text)
    assert parsed == expected and parsed.tzinfo == dt.UTC


@pytest.mark.parametrize("text", [
    "", "2021-08-14", "2021-08-14T22:27:00", "2021-08-14T22:27Z", "tomorrow", "2021-02-30T00:00:00Z",
    "2021-08-14T25:00:00Z", "10h", "2021-08-14T22:27:00+0200",
])
def test_parse_time_rejects_everything_else(text):
    with pytest.raises(ValueError, match="time"):
        locking.parse_time(text)


@pytest.mark.parametrize("when, text", [
    (dt.datetime(2021, 8, 14, 22, 27, tzinfo=dt.UTC), "2021-08-14T22:27:00Z"),
    (dt.datetime(2021, 8, 14, 22, 27, 0, 500000, tzinfo=dt.UTC), "2021-08-14T22:27:00.5Z"),
    (dt.datetime(2021, 8, 14, 22, 27, 0, 123, tzinfo=dt.UTC), "2021-08-14T22:27:00.000123Z"),
    (dt.datetime(2021, 8, 15, 0, 27, tzinfo=dt.timezone(dt.timedelta(hours=2))), "2021-08-14T22:27:00Z"),
])
def test_format_time_is_utc_rfc3339(when, text):
    assert locking.format_time(when) == text
    assert locking.parse_time(text) == when


# --- expiry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("expires, at, in_force", [
    ("", NOW, True),
    ("2021-08-14T12:00:01Z", NOW, True),
    ("2021-08-14T12:00:00.000001Z", NOW, True),
    ("2021-08-14T12:00:00Z", NOW, False),  # at the instant itself it has expired
    ("2021-08-14T11:59:59Z", NOW, False),
    ("2021-08-14T14:00:00+02:00", NOW, False),  # the same instant, another offset
    ("2021-08-14T14:00:01+02:00", NOW, True),
    ("not a time", NOW, True),  # never stored by the service; fails closed
])
def test_in_force(expires, at, in_force):
    assert locking.in_force(lock(expires=expires, user="u"), at) is in_force


@pytest.mark.parametrize("expires, expected", [
    ("", None),
    ("2021-08-14T22:27:00Z", dt.datetime(2021, 8, 14, 22, 27, tzinfo=dt.UTC)),
    ("garbage", None),
])
def test_expires_at(expires, expected):
    assert locking.expires_at(lock(expires=expires, user="u")) == expected


@pytest.mark.parametrize("expiries, expected", [
    ([], None),
    ([""], None),
    (["", "2021-08-14T13:00:00Z", "2021-08-14T12:30:00Z"], "2021-08-14T12:30:00Z"),
    (["2021-08-14T11:00:00Z", "2021-08-14T12:00:00Z"], None),  # all past (or now)
    (["2021-08-14T11:00:00Z", "2021-08-14T12:00:00.001Z"], "2021-08-14T12:00:00.001Z"),
])
def test_next_expiry(expiries, expected):
    locks = [lock(expires=e, user="u") for e in expiries]
    assert locking.next_expiry(locks, NOW) == (locking.parse_time(expected) if expected else None)


# --- matching --------------------------------------------------------------------------------

ALICE = locking.Interaction(user="alice", login="ubuntu", roles=["dev", "contractor"], server_id="node-1",
                            mfa_device="mfa-1", device="dev-1", access_request="ar-1", windows_desktop="win-1")


@pytest.mark.parametrize("target, matched", [
    ({"user": "alice"}, True),
    ({"user": "bob"}, False),
    ({"role": "contractor"}, True),
    ({"role": "dev"}, True),
    ({"role": "admin"}, False),
    ({"login": "ubuntu"}, True),
    ({"login": "root"}, False),
    ({"server_id": "node-1"}, True),
    ({"server_id": "node-2"}, False),
    ({"mfa_device": "mfa-1"}, True),
    ({"device": "dev-1"}, True),
    ({"access_request": "ar-1"}, True),
    ({"windows_desktop": "win-1"}, True),
    ({"windows_desktop": "win-2"}, False),
    ({"user": "bob", "role": "contractor"}, True),  # any field it sets
    ({"user": "bob", "login": "root"}, False),
    ({"user": "Alice"}, False),  # exact, case-sensitive
])
def test_matches_when_any_target_field_equals_the_interactions_value(target, matched):
    assert locking.matches(lock(**target), ALICE) is matched


@pytest.mark.parametrize("field", r.LOCK_TARGET_FIELDS)
def test_an_uninvolved_field_never_matches(field):
    nobody = locking.Interaction()
    # A target value can never be empty (the service requires a value), but even
    # a lock on a field the interaction leaves empty must not match it.
    assert locking.matches(lock(**{field: "x"}), nobody) is False


def test_every_target_field_has_an_interaction_field():
    fields = {f.name for f in dataclasses.fields(locking.Interaction)}
    assert set(locking.INTERACTION_FIELDS.values()) == fields
    assert set(locking.INTERACTION_FIELDS) == set(r.LOCK_TARGET_FIELDS)


def test_matching_locks_keeps_those_in_force_that_match_in_order():
    locks = [
        lock(name="a", user="alice"),
        lock(name="b", user="alice", expires="2021-08-14T11:00:00Z"),  # expired
        lock(name="c", role="dev", expires="2021-08-14T13:00:00Z"),
        lock(name="d", user="bob"),
        lock(name="e", login="ubuntu"),
    ]
    assert [x.metadata.name for x in locking.matching_locks(locks, ALICE, NOW)] == ["a", "c", "e"]
    later = NOW + dt.timedelta(hours=1)
    assert [x.metadata.name for x in locking.matching_locks(locks, ALICE, later)] == ["a", "e"]
    assert locking.matching_locks(iter(locks), locking.Interaction(user="carol"), NOW) == []


KEY = "SHA256:mXu4uS8Valt9tkpP1RLL+mNxjogzy99UT3rBT6tOykE"


@pytest.mark.parametrize("is_sk, device, mfa_device", [(False, KEY, ""), (True, KEY, KEY)])
def test_an_interaction_from_a_session_carries_its_login_key(is_sk, device, mfa_device):
    session = api.SessionInfo(sid="s", user="alice", login="ubuntu", server_id="node-1", server_hostname="h",
                              started="2021-08-14T12:00:00Z", roles=["dev"], key_fingerprint=KEY, key_is_sk=is_sk)
    assert locking.Interaction.of_session(session) == locking.Interaction(
        user="alice", login="ubuntu", roles=["dev"], server_id="node-1", device=device, mfa_device=mfa_device)


@pytest.mark.parametrize("is_sk, target, matched", [
    (False, {"device": KEY}, True),
    (True, {"device": KEY}, True),  # a FIDO key is a key too
    (False, {"mfa_device": KEY}, False),  # not a security key
    (True, {"mfa_device": KEY}, True),
    (False, {"device": KEY.lower()}, False),  # base64 is case-sensitive
])
def test_key_locks_match_the_fingerprint_of_the_login_key(is_sk, target, matched):
    session = api.SessionInfo(sid="s", user="alice", login="ubuntu", server_id="node-1", server_hostname="h",
                              started="2021-08-14T12:00:00Z", key_fingerprint=KEY, key_is_sk=is_sk)
    assert locking.matches(lock(**target), locking.Interaction.of_session(session)) is matched


def test_a_session_without_a_key_matches_no_key_lock():
    local = api.SessionInfo(sid="s", user="alice", login="ubuntu", server_id="n", server_hostname="h", started="")
    assert not locking.matches(lock(device=KEY), locking.Interaction.of_session(local))


def test_an_interaction_from_an_operator_request_is_its_user_and_roles():
    user = r.User(metadata=r.Metadata(name="alice"), spec=r.UserSpec(roles=["locksmith", "dev"]))
    interaction = locking.Interaction.of_operator(user)
    assert interaction == locking.Interaction(user="alice", roles=["locksmith", "dev"])
    assert locking.matches(lock(role="dev"), interaction) and locking.matches(lock(user="alice"), interaction)
    assert not locking.matches(lock(login="alice"), interaction)


# --- the message --------------------------------------------------------------------------------


@pytest.mark.parametrize("the_lock, text", [
    (lock("Suspicious activity.", user="foo@example.com"),
     'lock targeting User:"foo@example.com" is in force: Suspicious activity.'),
    (lock(user="foo"), 'lock targeting User:"foo" is in force'),
    (lock("Please come back tomorrow.", role="contractor"),
     'lock targeting Role:"contractor" is in force: Please come back tomorrow.'),
    (lock(server_id="363256df"), 'lock targeting Node:"363256df" is in force'),
    (lock("m", user="a", login="root"), 'lock targeting User:"a", Login:"root" is in force: m'),
    (lock(windows_desktop="WIN-1"), 'lock targeting WindowsDesktop:"WIN-1" is in force'),
])
def test_lock_message_as_the_original_words_it(the_lock, text):
    assert locking.lock_message(the_lock) == text
