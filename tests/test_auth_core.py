"""ringfence.auth: request signatures, freshness, replay, roles; identity files."""

from __future__ import annotations

import os
import re
import stat

import pytest

from ringfence import auth
from ringfence.contract.resources import Metadata, Role, RoleConditions, RoleSpec, Rule
from ringfence.keyfiles import read_identity, write_identity, write_secret

NOW = 1_800_000_000.0
SUBJECT = "ringfence.api.locks.create"
BODY = b'{"resources":[]}'


def identity(user: str = "alice") -> auth.Identity:
    return auth.Identity(user=user, seed=auth.new_user_seed())


def role(allow: list[tuple[list[str], list[str]]], deny: list[tuple[list[str], list[str]]] = ()) -> Role:
    return Role(metadata=Metadata(name="r"), spec=RoleSpec(
        allow=RoleConditions(rules=[Rule(resources=r, verbs=v) for r, v in allow]),
        deny=RoleConditions(rules=[Rule(resources=r, verbs=v) for r, v in deny])))


def test_a_signed_request_verifies_and_names_actor_and_key():
    ident = identity()
    headers = auth.sign_request(ident, SUBJECT, BODY, NOW)
    assert set(headers) == set(auth.SIGNED_HEADERS)
    assert headers[auth.HEADER_TIMESTAMP] == str(int(NOW * 1000))
    assert len(headers[auth.HEADER_NONCE]) == 32
    req = auth.verify_request(headers, SUBJECT, BODY, NOW + 1)
    assert req.actor == "alice" and req.nkey == ident.public_key and req.nkey.startswith("U")
    auth.check_registered(req, ident.public_key)


@pytest.mark.parametrize("change", ["subject", "body", "actor", "timestamp", "nonce", "nkey"])
def test_any_change_breaks_the_signature(change):
    ident = identity()
    headers = auth.sign_request(ident, SUBJECT, BODY, NOW)
    subject, body = SUBJECT, BODY
    if change == "subject":
        subject = "ringfence.api.locks.delete"
    elif change == "body":
        body = BODY + b" "
    elif change == "actor":
        headers[auth.HEADER_ACTOR] = "mallory"
    elif change == "timestamp":
        headers[auth.HEADER_TIMESTAMP] = str(int(NOW * 1000) + 1)
    elif change == "nonce":
        headers[auth.HEADER_NONCE] = "0" * 32
    else:
        headers[auth.HEADER_NKEY] = identity().public_key
    with pytest.raises(auth.AuthError, match="the signature does not verify with key U"):
        auth.verify_request(headers, subject, body, NOW)


def test_unsigned_and_incomplete_requests_are_named():
    with pytest.raises(auth.AuthError, match=r"^request is not signed: control requests need an operator identity"):
        auth.verify_request(None, SUBJECT, BODY, NOW)
    with pytest.raises(auth.AuthError, match=r"^request is not signed: "):
        auth.verify_request({auth.HEADER_ACTOR: "alice"}, SUBJECT, BODY, NOW)
    headers = auth.sign_request(identity(), SUBJECT, BODY, NOW)
    del headers[auth.HEADER_NONCE]
    with pytest.raises(auth.AuthError, match="header Ringfence-Nonce is missing"):
        auth.verify_request(headers, SUBJECT, BODY, NOW)


@pytest.mark.parametrize(("header", "value", "message"), [
    (auth.HEADER_TIMESTAMP, "yesterday", "is not unix milliseconds"),
    (auth.HEADER_NONCE, "short", "is not 32 hex characters"),
    (auth.HEADER_SIGNATURE, "abc", "is not a base64url ed25519 signature"),
    (auth.HEADER_NKEY, "UABC", "is not a public user nkey"),
])
def test_malformed_headers_are_refused(header, value, message):
    headers = auth.sign_request(identity(), SUBJECT, BODY, NOW)
    headers[header] = value
    with pytest.raises(auth.AuthError, match=message):
        auth.verify_request(headers, SUBJECT, BODY, NOW)


def test_a_public_key_of_another_type_is_refused():
    headers = auth.sign_request(identity(), SUBJECT, BODY, NOW)
    headers[auth.HEADER_NKEY] = "N" + headers[auth.HEADER_NKEY][1:]
    with pytest.raises(auth.AuthError, match="is not a public user nkey"):
        auth.verify_request(headers, SUBJECT, BODY, NOW)


@pytest.mark.parametrize(("offset", "ok"), [(0, True), (59.9, True), (-59.9, True), (60.5, False), (-61, False),
                                             (3600, False)])
def test_freshness_window(offset, ok):
    headers = auth.sign_request(identity(), SUBJECT, BODY, NOW)
    if ok:
        auth.verify_request(headers, SUBJECT, BODY, NOW + offset)
    else:
        with pytest.raises(auth.AuthError, match=r"timestamp is \d+s (old|in the future)"):
            auth.verify_request(headers, SUBJECT, BODY, NOW + offset)


def test_a_key_registered_to_someone_else_or_nobody_is_refused():
    req = auth.verify_request(auth.sign_request(identity("bob"), SUBJECT, BODY, NOW), SUBJECT, BODY, NOW)
    for registered in (None, "", identity().public_key):
        with pytest.raises(auth.AuthError, match='is not the registered operator key of user "bob"'):
            auth.check_registered(req, registered)


def test_nonce_cache_refuses_replays_within_the_window_and_forgets_after():
    cache = auth.NonceCache()
    ident = identity()
    req = auth.parse_headers(auth.sign_request(ident, SUBJECT, BODY, NOW))
    cache.check_and_add(req, NOW)
    with pytest.raises(auth.AuthError, match=f"nonce {req.nonce} was already used"):
        cache.check_and_add(req, NOW + 59)
    other = auth.parse_headers(auth.sign_request(ident, SUBJECT, BODY, NOW))
    cache.check_and_add(other, NOW)
    # Past the freshness window the request is refused as stale anyway; the cache lets go.
    later = auth.parse_headers(auth.sign_request(ident, SUBJECT, BODY, NOW + 200))
    cache.check_and_add(later, NOW + 200)
    assert len(cache) == 1


def test_nonce_cache_is_bounded():
    cache = auth.NonceCache(max_entries=2)
    ident = identity()
    for _ in range(2):
        cache.check_and_add(auth.parse_headers(auth.sign_request(ident, SUBJECT, BODY, NOW)), NOW)
    with pytest.raises(auth.AuthError, match="too many signed requests"):
        cache.check_and_add(auth.parse_headers(auth.sign_request(ident, SUBJECT, BODY, NOW)), NOW)


LOCKSMITH = role([(["lock"], ["list", "create", "read", "update", "delete"])])


@pytest.mark.parametrize(("roles", "resource", "verb", "allowed"), [
    ([LOCKSMITH], "lock", "create", True),
    ([LOCKSMITH], "lock", "delete", True),
    ([LOCKSMITH], "role", "create", False),
    ([LOCKSMITH], "event", "list", False),
    ([], "lock", "list", False),
    ([role([(["*"], ["*"])])], "cluster_auth_preference", "update", True),
    ([role([(["*"], ["read", "list"])])], "user", "list", True),
    ([role([(["*"], ["read", "list"])])], "user", "create", False),
    ([role([(["lock", "session"], ["*"])])], "session", "delete", True),
    # deny overrides allow, also across roles
    ([role([(["*"], ["*"])], [(["lock"], ["delete"])])], "lock", "delete", False),
    ([role([(["*"], ["*"])], [(["lock"], ["delete"])])], "lock", "create", True),
    ([LOCKSMITH, role([], [(["*"], ["create"])])], "lock", "create", False),
    ([role([(["*"], ["*"])], [(["*"], ["*"])])], "lock", "list", False),
])
def test_roles_allow_and_deny(roles, resource, verb, allowed):
    assert auth.is_allowed(roles, resource, verb) is allowed


def test_first_denied_names_the_first_action_not_allowed():
    assert auth.first_denied([LOCKSMITH], [("lock", "create"), ("lock", "update")]) is None
    assert auth.first_denied([LOCKSMITH], [("lock", "create"), ("role", "update"), ("user", "create")]) == (
        "role", "update")
    assert auth.access_denied("create", "lock") == 'access denied to perform action "create" on "lock"'


def test_identity_files_round_trip_with_mode_0600(tmp_path):
    ident = identity("alice@example.com")
    path = write_identity(tmp_path / "sub" / "alice.nk", ident)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert read_identity(path) == ident
    assert ident.public_key in path.read_text()
    with pytest.raises(FileExistsError):
        write_identity(path, identity())
    with pytest.raises(FileExistsError):
        write_secret(path, "x")
    assert read_identity(path) == ident
    assert [p.name for p in path.parent.iterdir()] == ["alice.nk"]  # no temporary file left


@pytest.mark.parametrize(("text", "message"), [
    ("", "not an operator identity file"),
    ("user: alice\n", "not an operator identity file"),
    ("hello\n", "not an operator identity file"),
    ("user: alice\nseed: SUNOPE\n", "seed: not an nkey seed"),
])
def test_bad_identity_files_are_named(text, message):
    with pytest.raises(auth.AuthError, match=message) as info:
        auth.parse_identity(text, "/x/id.nk")
    assert str(info.value).startswith("/x/id.nk: ")


def test_a_bare_seed_is_not_an_identity():
    with pytest.raises(auth.AuthError, match="a bare nkey seed names no user"):
        auth.parse_identity(auth.new_user_seed() + "\n", "f")


# --- console grants (Ringfence-Delegation) ---------------------------------------------------------


def console_request(operator: auth.Identity, ttl: float = 3600.0, at: float = NOW, session_user: str | None = None):
    """A request the web console signs with its own session key, carrying the operator's grant."""
    session = auth.Identity(user=session_user or operator.user, seed=auth.new_user_seed())
    grant = auth.sign_grant(operator, session.public_key, at, ttl)
    headers = auth.sign_request(session, SUBJECT, BODY, at)
    headers[auth.HEADER_DELEGATION] = grant
    return headers


def test_a_console_request_is_vouched_for_by_the_operator_key_that_signed_its_grant():
    operator = identity()
    headers = console_request(operator)
    req = auth.verify_request(headers, SUBJECT, BODY, NOW + 1)
    key = auth.vouching_key(headers, req, NOW + 1)
    assert key == operator.public_key != req.nkey
    auth.check_registered(req, operator.public_key, key)
    # Without a grant the request's own key must be the registered one: the session key is not.
    with pytest.raises(auth.AuthError, match="is not the registered operator key"):
        auth.check_registered(req, operator.public_key)


def test_console_grants_that_must_be_refused():
    operator, other = identity(), identity()
    cases = {}
    headers = console_request(operator)
    cases["expired"] = (headers, NOW + 3601, "has expired; sign in again with `ringfence web login`")
    headers = console_request(operator, ttl=auth.MAX_DELEGATION + 60)
    cases["too long"] = (headers, NOW, "lasts longer than 24h")
    headers = console_request(operator, session_user="mallory")  # grant for alice, request as mallory
    cases["other actor"] = (headers, NOW, 'the console grant is for user "alice"')
    headers = console_request(operator)
    headers[auth.HEADER_DELEGATION] = console_request(operator)[auth.HEADER_DELEGATION]  # another session's grant
    cases["other session key"] = (headers, NOW, "not this request's")
    headers = console_request(operator)
    body, sig = headers[auth.HEADER_DELEGATION].split(".")
    forged = auth._b64(auth._unb64(body).replace(operator.public_key.encode(), other.public_key.encode()))
    headers[auth.HEADER_DELEGATION] = f"{forged}.{sig}"
    cases["forged key"] = (headers, NOW, f"does not verify with key {other.public_key}")
    headers = console_request(operator)
    headers[auth.HEADER_DELEGATION] = "not a grant"
    cases["garbage"] = (headers, NOW, "is not GRANT.SIGNATURE in base64url")
    for name, (headers, now, message) in cases.items():
        req = auth.verify_request(headers, SUBJECT, BODY, NOW)
        with pytest.raises(auth.AuthError, match=re.escape(message)):
            auth.vouching_key(headers, req, now)
            pytest.fail(f"{name}: accepted")
