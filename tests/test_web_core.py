"""services/web/core.py: console sign-in (offer, grant, one-time URL, session), CSRF, and page input
turned into the CLI's requests. Pure: no NATS, no HTTP."""

from __future__ import annotations

import datetime as dt

import pytest

from ringfence import auth
from services.web import core

NOW = 1_800_000_000.0


def signed_in(sessions: core.Sessions, operator: auth.Identity, at: float = NOW) -> str:
    """The one-time token `ringfence web login` gets for `operator`."""
    offer = sessions.offer(at)
    grant = auth.sign_grant(operator, offer.public_key, at, sessions.session_ttl)
    return sessions.accept(offer.id, grant, operator.public_key, operator.user, at)


def test_a_sign_in_url_opens_one_session_once_and_not_after_its_ttl():
    sessions, alice = core.Sessions(), auth.Identity("alice", auth.new_user_seed())
    token = signed_in(sessions, alice)
    session = sessions.redeem(token, NOW + 1)
    assert session.user == "alice" and session.identity.seed != alice.seed  # never the operator's key
    assert sessions.get(session.id, NOW + 2) is session
    with pytest.raises(core.ConsoleError, match="already used or has expired") as second:
        sessions.redeem(token, NOW + 2)
    assert second.value.status == 403
    late = signed_in(sessions, alice)
    with pytest.raises(core.ConsoleError, match="already used or has expired"):
        sessions.redeem(late, NOW + core.LOGIN_TTL + 1)
    with pytest.raises(core.ConsoleError, match="not signed in") as gone:
        sessions.get(session.id, NOW + sessions.session_ttl + 1)
    assert gone.value.status == 401


def test_a_console_request_is_signed_with_the_session_key_and_vouched_for_by_the_operator():
    sessions, alice = core.Sessions(), auth.Identity("alice", auth.new_user_seed())
    session = sessions.redeem(signed_in(sessions, alice), NOW)
    headers = session.headers("ringfence.api.locks.lock", b"{}", NOW)
    req = auth.verify_request(headers, "ringfence.api.locks.lock", b"{}", NOW)
    assert req.actor == "alice" and auth.vouching_key(headers, req, NOW) == alice.public_key


def test_grants_that_do_not_fit_the_offer_or_the_signer_are_refused():
    sessions = core.Sessions()
    alice, bob = auth.Identity("alice", auth.new_user_seed()), auth.Identity("bob", auth.new_user_seed())
    offer, other = sessions.offer(NOW), sessions.offer(NOW)
    cases = {
        "grant for another offer's key": (offer.id, auth.sign_grant(alice, other.public_key, NOW, 3600),
                                          alice, "for the offered session key"),
        "grant signed by someone else": (other.id, auth.sign_grant(bob, other.public_key, NOW, 3600), alice,
                                         'must be signed by "alice"'),
    }
    for name, (offer_id, grant, signer, message) in cases.items():
        with pytest.raises(core.ConsoleError, match=message):
            sessions.accept(offer_id, grant, signer.public_key, signer.user, NOW)
            pytest.fail(name)
    # An offer is used up by its first answer, right or wrong, and expires unanswered.
    with pytest.raises(core.ConsoleError, match="unknown or expired"):
        sessions.accept(offer.id, auth.sign_grant(alice, offer.public_key, NOW, 3600), alice.public_key, "alice", NOW)
    late = sessions.offer(NOW)
    with pytest.raises(core.ConsoleError, match="unknown or expired"):
        sessions.accept(late.id, auth.sign_grant(alice, late.public_key, NOW, 3600), alice.public_key, "alice",
                        NOW + core.OFFER_TTL + 1)


def test_pending_sign_ins_are_bounded():
    sessions = core.Sessions()
    first = sessions.offer(NOW)
    for _ in range(core.MAX_PENDING):
        sessions.offer(NOW)
    assert len(sessions.offers) == core.MAX_PENDING and first.id not in sessions.offers


@pytest.mark.parametrize(("csrf", "origin", "host", "refused"), [
    ("right", None, "127.0.0.1:3080", None),
    ("right", "http://127.0.0.1:3080", "127.0.0.1:3080", None),
    (None, "http://127.0.0.1:3080", "127.0.0.1:3080", "X-CSRF-Token"),
    ("wrong", "http://127.0.0.1:3080", "127.0.0.1:3080", "X-CSRF-Token"),
    ("right", "http://evil.example", "127.0.0.1:3080", "another origin"),
    ("right", "http://127.0.0.1:3081", "127.0.0.1:3080", "another origin"),
])
def test_writes_need_the_sessions_csrf_token_and_this_origin(csrf, origin, host, refused):
    sessions, alice = core.Sessions(), auth.Identity("alice", auth.new_user_seed())
    session = sessions.redeem(signed_in(sessions, alice), NOW)
    token = session.csrf if csrf == "right" else csrf
    if refused is None:
        core.check_write(session, token, origin, host)
    else:
        with pytest.raises(core.ConsoleError, match=refused):
            core.check_write(session, token, origin, host)


WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


@pytest.mark.parametrize(("query", "expected"), [
    ({}, dict(start="", limit=100, order="desc", event_types=[])),
    ({"since": "1h", "type": "lock.created, session.start", "user": "bob", "limit": "5", "order": "asc",
      "page": "k1"}, dict(start="2026-01-02T02:04:05.000Z", event_types=["lock.created", "session.start"],
                          user="bob", limit=5, order="asc", start_key="k1")),
    ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00+01:00"},
     dict(start="2026-01-01T00:00:00.000Z", end="2026-01-01T23:00:00.000Z")),
])
def test_search_filters_become_the_events_search_request(query, expected):
    request = core.search_request(query, WHEN)
    assert {k: getattr(request, k) for k in expected} == expected


@pytest.mark.parametrize(("query", "message"), [
    ({"since": "1h", "from": "2026-01-01T00:00:00Z"}, "only one of since and from"),
    ({"since": "soon"}, "since:"),
    ({"type": "lock.nope"}, '"lock.nope" is not an event type'),
    ({"limit": "0"}, "limit"), ({"limit": "100001"}, "limit"), ({"order": "up"}, "order"),
    ({"from": "yesterday"}, '"yesterday" is not a time'),
])
def test_bad_search_filters_are_named(query, message):
    with pytest.raises(core.ConsoleError, match=message):
        core.search_request(query, WHEN)


def test_lock_forms_become_lock_requests_and_bad_fields_are_named():
    request = core.lock_request({"target": {"user": " bob ", "login": "root"}, "message": "stop", "ttl": "1h"})
    assert request.target.user == "bob" and request.target.login == "root" and request.ttl == "1h"
    for body, message in [({"target": "bob"}, "target: expected an object"),
                          ({"target": {"colour": "red"}}, '"colour" is not a lock target'),
                          ({"target": {"user": ["bob"]}}, "user: expected text"),
                          ({"target": {"user": "b"}, "message": "x" * (core.MAX_TEXT + 1)}, "message: longer")]:
        with pytest.raises(core.ConsoleError, match=message):
            core.lock_request(body)
