"""Operator identity: signed control requests and role-based access, in one place.

Pure (no NATS, no files, no clock of its own): the CLI signs with it
(cli/client.py) and every service verifies with it (runtime/operator_auth.py).

An operator identity is an ed25519 key in nkey form: a seed (`SU...`, secret)
and its public user key (`U...`), registered on the user as
`spec.operator_nkey`. Every control request carries five headers:

    Ringfence-Actor      the user name the request acts as
    Ringfence-Nkey       the public user nkey that signed it
    Ringfence-Timestamp  unix time in milliseconds when it was signed
    Ringfence-Nonce      32 random hex characters, never reused
    Ringfence-Signature  base64url (no padding) ed25519 signature over

        ringfence-request-v1 \\n subject \\n actor \\n timestamp \\n nonce \\n sha256(body) in hex

A service accepts a request when the signature verifies with the named key,
the timestamp is within MAX_SKEW of its clock, the nonce was not seen within
that window, and the key is the actor's registered operator_nkey. Then the
actor's roles decide: allow rules grant (resource, verb) pairs, "*" matching
any; a matching deny rule wins over every allow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing
import nkeys

from .contract.resources import Role, Rule

HEADER_ACTOR = "Ringfence-Actor"
HEADER_NKEY = "Ringfence-Nkey"
HEADER_TIMESTAMP = "Ringfence-Timestamp"
HEADER_NONCE = "Ringfence-Nonce"
HEADER_SIGNATURE = "Ringfence-Signature"
SIGNED_HEADERS = (HEADER_ACTOR, HEADER_NKEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

SIGNATURE_CONTEXT = "ringfence-request-v1"
MAX_SKEW = 60.0  # seconds a request's timestamp may be off the verifier's clock, either way
NONCE_CACHE_MAX = 200_000  # nonces remembered at most (one per accepted request within 2*MAX_SKEW)

WILDCARD = "*"
ACCESS_DENIED_KIND = "access_denied"

_NONCE = re.compile(r"^[0-9a-f]{32}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,16}$")
_NKEY_LEN = 56


class AuthError(Exception):
    """A request is refused; str() says why, in words an operator can act on."""


def access_denied(verb: str, resource: str) -> str:
    """The message the original prints, verbatim: access denied to perform action "create" on "lock"."""
    return f'access denied to perform action "{verb}" on "{resource}"'


# --- keys ------------------------------------------------------------------------------------


def new_user_seed() -> str:
    """A fresh ed25519 key as a user nkey seed (`SU...`)."""
    raw = bytes(nacl.signing.SigningKey.generate())
    return nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER).decode()


def _keypair(seed: str) -> nkeys.KeyPair:
    try:
        return nkeys.from_seed(bytearray(seed.strip().encode()))
    except Exception:  # nkeys raises several error types, and binascii errors on bad base32
        raise AuthError("not an nkey seed (expected SU... as written by `ringfence users add --operator`)") from None


def public_key_of(seed: str) -> str:
    kp = _keypair(seed)
    prefix, _ = nkeys.decode_seed(bytearray(seed.strip().encode()))
    if prefix != nkeys.PREFIX_BYTE_USER:
        raise AuthError("not a user nkey seed (expected SU...)")
    return kp.public_key.decode()


def _verify_key(public: str) -> nacl.signing.VerifyKey:
    """The ed25519 key inside a public user nkey, after checking its type and checksum."""
    if len(public) != _NKEY_LEN or not public.startswith("U"):
        raise AuthError(f'"{public[:64]}" is not a public user nkey (56 characters, U...)')
    try:
        raw = base64.b32decode(public)
    except (binascii.Error, ValueError):
        raise AuthError(f'"{public}" is not a public user nkey (bad base32)') from None
    if raw[0] != nkeys.PREFIX_BYTE_USER or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise AuthError(f'"{public}" is not a public user nkey (bad prefix or checksum)')
    return nacl.signing.VerifyKey(bytes(raw[1:-2]))


# --- signing and verifying ---------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """An operator identity as the CLI holds it: the user it acts as and the secret seed."""

    user: str
    seed: str

    @property
    def public_key(self) -> str:
        return public_key_of(self.seed)


def signing_input(subject: str, actor: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join((SIGNATURE_CONTEXT, subject, actor, timestamp, nonce, digest)).encode()


def new_nonce() -> str:
    return secrets.token_hex(16)


def sign_request(identity: Identity, subject: str, body: bytes, now: float, nonce: str | None = None
                 ) -> dict[str, str]:
    """The headers that make `body` on `subject` a signed request of `identity`, made at `now`."""
    kp = _keypair(identity.seed)
    timestamp = str(int(now * 1000))
    nonce = nonce or new_nonce()
    signature = kp.sign(signing_input(subject, identity.user, timestamp, nonce, body))
    return {
        HEADER_ACTOR: identity.user,
        HEADER_NKEY: kp.public_key.decode(),
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: base64.urlsafe_b64encode(signature).decode().rstrip("="),
    }


@dataclass(frozen=True)
class SignedRequest:
    """What a request claims; trusted only after verify() and the registration check."""

    actor: str
    nkey: str
    timestamp_ms: int
    nonce: str
    signature: bytes


UNSIGNED = (
    "request is not signed: control requests need an operator identity "
    "(`ringfence users add NAME --operator` creates one; the CLI reads it from --identity, "
    "RINGFENCE_IDENTITY, ~/.ringfence/identity or <data_dir>/admin.nk)"
)


def parse_headers(headers: Mapping[str, str] | None) -> SignedRequest:
    """The signed-request headers, checked for shape; AuthError names what is missing or malformed."""
    headers = headers or {}
    present = [h for h in SIGNED_HEADERS if headers.get(h)]
    if not present or present == [HEADER_ACTOR]:
        raise AuthError(UNSIGNED)
    missing = [h for h in SIGNED_HEADERS if not headers.get(h)]
    if missing:
        raise AuthError(f"request is not signed properly: header {missing[0]} is missing")
    actor, nkey = headers[HEADER_ACTOR], headers[HEADER_NKEY]
    timestamp, nonce, signature = headers[HEADER_TIMESTAMP], headers[HEADER_NONCE], headers[HEADER_SIGNATURE]
    if not _TIMESTAMP.match(timestamp):
        raise AuthError(f'request is not signed properly: {HEADER_TIMESTAMP} "{timestamp[:40]}" is not unix '
                        "milliseconds")
    if not _NONCE.match(nonce):
        raise AuthError(f'request is not signed properly: {HEADER_NONCE} "{nonce[:80]}" is not 32 hex characters')
    try:
        raw_sig = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (binascii.Error, ValueError):
        raw_sig = b""
    if len(raw_sig) != 64:
        raise AuthError(f"request is not signed properly: {HEADER_SIGNATURE} is not a base64url ed25519 signature")
    return SignedRequest(actor, nkey, int(timestamp), nonce, raw_sig)


def check_freshness(req: SignedRequest, now: float, max_skew: float = MAX_SKEW) -> None:
    skew = now - req.timestamp_ms / 1000
    if abs(skew) > max_skew:
        direction = "old" if skew > 0 else "in the future"
        raise AuthError(
            f"request refused: its timestamp is {abs(skew):.0f}s {direction} (at most {max_skew:.0f}s either way "
            "is accepted); a replayed request, or the clocks of the CLI's and the service's machines differ "
            "(check NTP)"
        )


def verify_signature(req: SignedRequest, subject: str, body: bytes) -> None:
    key = _verify_key(req.nkey)
    message = signing_input(subject, req.actor, str(req.timestamp_ms), req.nonce, body)
    try:
        key.verify(message, req.signature)
    except nacl.exceptions.BadSignatureError:
        raise AuthError(
            f"request refused: the signature does not verify with key {req.nkey} "
            "(the request was altered on the way, or signed with another key)"
        ) from None


def check_registered(req: SignedRequest, registered_nkey: str | None, key: str | None = None) -> None:
    """`registered_nkey`: the actor's spec.operator_nkey, or None when there is no such user;
    `key`: the key that must be it (default the request's own; see vouching_key)."""
    key = key or req.nkey
    if not registered_nkey or not secrets.compare_digest(registered_nkey, key):
        raise AuthError(
            f'request refused: key {key} is not the registered operator key of user "{req.actor}" '
            f"(`ringfence users add {req.actor or 'NAME'} --operator` registers a new one)"
        )


class NonceCache:
    """Nonces of accepted requests, each kept until its request could no longer pass the freshness check.

    Bounded: when full (NONCE_CACHE_MAX live nonces), requests are refused
    until entries expire, rather than forgetting nonces that could be replayed."""

    def __init__(self, max_skew: float = MAX_SKEW, max_entries: int = NONCE_CACHE_MAX) -> None:
        self.max_skew = max_skew
        self.max_entries = max_entries
        self._expires: dict[str, float] = {}
        self._order: OrderedDict[str, float] = OrderedDict()  # insertion order ~ expiry order

    def __len__(self) -> int:
        return len(self._expires)

    def _purge(self, now: float) -> None:
        while self._order:
            nonce, expires = next(iter(self._order.items()))
            if expires > now:
                # Insertion order is not strictly expiry order (timestamps vary by up
                # to 2*max_skew); stale entries behind a live one are purged later.
                break
            self._order.popitem(last=False)
            if self._expires.get(nonce) == expires:
                del self._expires[nonce]

    def check_and_add(self, req: SignedRequest, now: float) -> None:
        self._purge(now)
        expires = self._expires.get(req.nonce)
        if expires is not None and expires > now:
            raise AuthError(f"request refused: nonce {req.nonce} was already used (a replayed request)")
        if len(self._expires) >= self.max_entries:
            raise AuthError("request refused: too many signed requests within the replay window; try again shortly")
        # The request passes the freshness check until timestamp + max_skew.
        until = max(req.timestamp_ms / 1000 + self.max_skew, now) + 1.0
        self._expires[req.nonce] = until
        self._order[req.nonce] = until
        self._order.move_to_end(req.nonce)


# --- delegation: the web console acting for a signed-in operator ------------------------------

HEADER_DELEGATION = "Ringfence-Delegation"
DELEGATION_CONTEXT = "ringfence-delegation-v1"
MAX_DELEGATION = 24 * 3600.0  # seconds a grant may last at most, whatever it says
_GRANT_PART = re.compile(r"^[A-Za-z0-9_-]{1,2048}$")


@dataclass(frozen=True)
class Grant:
    """An operator's signed statement: requests signed with `session_nkey` act as `actor` until `expires_ms`.

    The operator's CLI signs it (`ringfence web login`) for a key the web console made and
    keeps; the console never sees the operator's seed, and the operator's roles still decide
    every request (the services check them as for a request the operator signed)."""

    actor: str
    operator_nkey: str  # the operator's registered key, which signs the grant
    session_nkey: str  # the console session's key, which signs each request
    issued_ms: int
    expires_ms: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _grant_bytes(grant: Grant) -> bytes:
    fields = (grant.actor, grant.operator_nkey, grant.session_nkey, str(grant.issued_ms), str(grant.expires_ms))
    return "\n".join((DELEGATION_CONTEXT, *fields)).encode()


def sign_grant(identity: Identity, session_nkey: str, now: float, ttl: float) -> str:
    """The Ringfence-Delegation header value: the grant's fields and the operator's signature."""
    _verify_key(session_nkey)
    grant = Grant(identity.user, identity.public_key, session_nkey, int(now * 1000), int((now + ttl) * 1000))
    signature = _keypair(identity.seed).sign(_grant_bytes(grant))
    return ".".join((_b64(_grant_bytes(grant)), _b64(signature)))


def parse_grant(value: str) -> tuple[Grant, bytes]:
    """The grant in a Ringfence-Delegation value and its signature, checked for shape only."""
    body, _, signature = value.partition(".")
    if not (_GRANT_PART.match(body) and _GRANT_PART.match(signature)):
        raise AuthError(f"request refused: {HEADER_DELEGATION} is not GRANT.SIGNATURE in base64url")
    try:
        fields = _unb64(body).decode().split("\n")
        raw_sig = _unb64(signature)
    except (binascii.Error, ValueError):
        raise AuthError(f"request refused: {HEADER_DELEGATION} is not GRANT.SIGNATURE in base64url") from None
    if len(fields) != 6 or fields[0] != DELEGATION_CONTEXT or not all(map(_TIMESTAMP.match, fields[4:])):
        raise AuthError(f"request refused: {HEADER_DELEGATION} does not hold a {DELEGATION_CONTEXT} grant")
    grant = Grant(fields[1], fields[2], fields[3], int(fields[4]), int(fields[5]))
    return grant, raw_sig


def check_grant(value: str, req: SignedRequest, now: float) -> Grant:
    """The grant a delegated request carries, after checking that the operator signed it, that it
    names this request's actor and signing key, and that it is in force now."""
    grant, signature = parse_grant(value)
    if grant.actor != req.actor or grant.session_nkey != req.nkey:
        raise AuthError(f'request refused: the console grant is for user "{grant.actor}" and key '
                        f"{grant.session_nkey}, not this request's")
    try:
        _verify_key(grant.operator_nkey).verify(_grant_bytes(grant), signature)
    except nacl.exceptions.BadSignatureError:
        raise AuthError(f"request refused: the console grant does not verify with key {grant.operator_nkey}") from None
    if grant.expires_ms - grant.issued_ms > MAX_DELEGATION * 1000 or grant.issued_ms > (now + MAX_SKEW) * 1000:
        raise AuthError(f"request refused: the console grant of \"{grant.actor}\" lasts longer than "
                        f"{MAX_DELEGATION / 3600:.0f}h or starts in the future")
    if now * 1000 >= grant.expires_ms:
        raise AuthError(f'request refused: the console sign-in of "{grant.actor}" has expired; '
                        "sign in again with `ringfence web login`")
    return grant


def vouching_key(headers: Mapping[str, str] | None, req: SignedRequest, now: float) -> str:
    """The operator key that stands behind a verified request: the key that signed it, or
    for a console request (Ringfence-Delegation) the key that signed its grant."""
    value = (headers or {}).get(HEADER_DELEGATION)
    return check_grant(value, req, now).operator_nkey if value else req.nkey


def verify_request(headers: Mapping[str, str] | None, subject: str, body: bytes, now: float,
                   max_skew: float = MAX_SKEW) -> SignedRequest:
    """Shape, freshness and signature (not registration or replay: those need state)."""
    req = parse_headers(headers)
    check_freshness(req, now, max_skew)
    verify_signature(req, subject, body)
    return req


# --- role-based access -----------------------------------------------------------------------------


def _matches(rule: Rule, resource: str, verb: str) -> bool:
    return (WILDCARD in rule.resources or resource in rule.resources) and (
        WILDCARD in rule.verbs or verb in rule.verbs
    )


def is_allowed(roles: Iterable[Role], resource: str, verb: str) -> bool:
    """Some allow rule of some role grants (resource, verb) and no deny rule of any role matches it."""
    roles = list(roles)
    if any(_matches(rule, resource, verb) for role in roles for rule in role.spec.deny.rules):
        return False
    return any(_matches(rule, resource, verb) for role in roles for rule in role.spec.allow.rules)


def first_denied(roles: Iterable[Role], actions: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """The first (resource, verb) of `actions` the roles do not allow, or None when all are allowed."""
    roles = list(roles)
    for resource, verb in actions:
        if not is_allowed(roles, resource, verb):
            return resource, verb
    return None


def may_join(roles: Iterable[Role], session_roles: Iterable[str], mode: str, kind: str = "ssh") -> bool:
    """May a user with `roles` join, in `mode`, a session whose user has `session_roles`?
    A join_sessions entry allowing the mode for one of those roles (or "*") grants it; so
    does a rule allowing every verb on sessions; a rule allowing "read" on sessions grants
    observer, as it did before join_sessions existed."""
    roles, wanted = list(roles), set(session_roles)
    for role in roles:
        for entry in role.spec.allow.join_sessions:
            kind_ok = not entry.kinds or "*" in entry.kinds or kind in entry.kinds
            if mode in entry.modes and kind_ok and ("*" in entry.roles or wanted & set(entry.roles)):
                return True
    return is_allowed(roles, "session", "*") or (mode == "observer" and is_allowed(roles, "session", "read"))


# --- identity files ------------------------------------------------------------------------------------

IDENTITY_FORMAT = """\
# Ringfence operator identity of user "{user}" (public key {public}).
# The ringfence CLI signs control requests with it; whoever holds this file acts as
# "{user}". Keep it secret (mode 0600). Use it with --identity FILE,
# RINGFENCE_IDENTITY=FILE, or as ~/.ringfence/identity.
user: {user}
seed: {seed}
"""


def format_identity(identity: Identity) -> str:
    return IDENTITY_FORMAT.format(user=identity.user, public=identity.public_key, seed=identity.seed)


def parse_identity(text: str, source: str) -> Identity:
    """`user: NAME` and `seed: SU...` lines (comments with #); AuthError naming `source` otherwise."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            if line.startswith("SU") and "seed" not in fields:
                raise AuthError(f"{source}: a bare nkey seed names no user; write identity files with "
                                "`ringfence users add NAME --operator`")
            raise AuthError(f"{source}: not an operator identity file (expected `user:` and `seed:` lines)")
        fields[key.strip()] = value.strip()
    user, seed = fields.get("user", ""), fields.get("seed", "")
    if not user or not seed:
        raise AuthError(f"{source}: not an operator identity file (expected `user:` and `seed:` lines)")
    try:
        public_key_of(seed)
    except AuthError as exc:
        raise AuthError(f"{source}: seed: {exc}") from None
    return Identity(user=user, seed=seed)
