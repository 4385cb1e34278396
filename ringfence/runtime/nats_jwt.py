"""NATS JWTs (nats-io/jwt v2) for the auth callout: decode the server's authorization
request, issue a user JWT with its permissions, wrap it in the authorization response.

A JWT is `base64url(header).base64url(claims).base64url(ed25519 signature)` (no padding),
header {"typ":"JWT","alg":"ed25519-nkey"}, signed by the nkey named in `iss`. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
NKEY_LEN = 56


class JwtError(Exception):
    """A JWT or signature that does not verify; the message says which part."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_account_seed() -> str:
    """A fresh account nkey seed (`SA...`): the issuer of the user JWTs the callout hands out."""
    raw = bytes(nacl.signing.SigningKey.generate())
    return nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_ACCOUNT).decode()


def keypair(seed: str) -> nkeys.KeyPair:
    try:
        return nkeys.from_seed(bytearray(seed.strip().encode()))
    except Exception:  # nkeys raises several error types, binascii others
        raise JwtError("not an nkey seed") from None


def verify_key(public: str, prefixes: tuple[int, ...]) -> nacl.signing.VerifyKey:
    """The ed25519 key inside a public nkey whose type is one of `prefixes`."""
    if len(public) != NKEY_LEN:
        raise JwtError(f'"{public[:64]}" is not a public nkey (56 characters)')
    try:
        raw = base64.b32decode(public)
    except (binascii.Error, ValueError):
        raise JwtError(f'"{public}" is not a public nkey (bad base32)') from None
    if raw[0] not in prefixes or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise JwtError(f'"{public}" is not a public nkey of the expected kind (prefix or checksum)')
    return nacl.signing.VerifyKey(bytes(raw[1:-2]))


def verify_nonce(public_user_nkey: str, nonce: str, signature: str) -> None:
    """A client's nkey signature over the server's nonce (nats clients send base64, std or url)."""
    key = verify_key(public_user_nkey, (nkeys.PREFIX_BYTE_USER,))
    sig = None
    for decode in (_unb64, base64.b64decode):
        try:
            sig = decode(signature)
            break
        except (binascii.Error, ValueError):
            continue
    if sig is None or not nonce:
        raise JwtError("no nonce signature")
    try:
        key.verify(nonce.encode(), sig)
    except nacl.exceptions.BadSignatureError:
        raise JwtError("the nonce signature does not verify") from None


def encode(claims: dict[str, Any], issuer_seed: str) -> str:
    kp = keypair(issuer_seed)
    body = dict(claims)
    body.setdefault("jti", _b64(secrets.token_bytes(16)))
    body.setdefault("iat", int(time.time()))
    body["iss"] = kp.public_key.decode()
    signing_input = _b64(json.dumps(HEADER).encode()) + "." + _b64(json.dumps(body, separators=(",", ":")).encode())
    return signing_input + "." + _b64(kp.sign(signing_input.encode()))


def decode(token: str, issuer_prefixes: tuple[int, ...]) -> dict[str, Any]:
    """The claims, once the signature verifies with the `iss` key (of one of `issuer_prefixes`)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT (expected three dot-separated parts)")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error):
        raise JwtError("not a JWT (bad base64 or JSON)") from None
    if not isinstance(header, dict) or header.get("alg") not in ("ed25519-nkey", "ed25519"):
        raise JwtError(f"unsupported JWT algorithm {header.get('alg') if isinstance(header, dict) else header!r}")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise JwtError("JWT claims without an issuer")
    try:
        verify_key(claims["iss"], issuer_prefixes).verify(f"{parts[0]}.{parts[1]}".encode(), signature)
    except nacl.exceptions.BadSignatureError:
        raise JwtError("the JWT signature does not verify") from None
    return claims


def user_jwt(*, user_nkey: str, account: str, name: str, permissions: dict[str, Any], expires: int,
             issuer_seed: str) -> str:
    """A user JWT for the callout response. `permissions`: {"pub": {"allow": [...], "deny": [...]},
    "sub": {...}, "resp": {"max": 1, "ttl": 0} or absent}. `account` places the user (config mode)."""
    nats = {**permissions, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}
    return encode({"sub": user_nkey, "aud": account, "name": name, "exp": expires, "nats": nats}, issuer_seed)


def authorization_response(*, user_nkey: str, server_id: str, issuer_seed: str, user_token: str = "",
                           error: str = "") -> str:
    nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user_token:
        nats["jwt"] = user_token
    if error:
        nats["error"] = error
    return encode({"sub": user_nkey, "aud": server_id, "nats": nats}, issuer_seed)


SERVER_PREFIXES = (nkeys.PREFIX_BYTE_SERVER,)
