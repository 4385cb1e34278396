"""Sealing a live session's frames to the one operator who joined it.

A join carries the joiner's Curve25519 public key (a fresh key pair per join);
the enforcer answers with a key of its own for that join. Output frames (and a
peer's keystrokes the other way) travel as NaCl boxes between the two, so a
NATS credential that can subscribe to the join's subject still reads nothing.
"""

from __future__ import annotations

import base64

import msgspec
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from .contract.api import JoinFrame


class SealError(ValueError):
    pass


def new_key() -> PrivateKey:
    return PrivateKey.generate()


def public_text(key: PrivateKey) -> str:
    return base64.b64encode(bytes(key.public_key)).decode()


def box(own: PrivateKey, their_public: str) -> Box:
    try:
        raw = base64.b64decode(their_public, validate=True)
        return Box(own, PublicKey(raw))
    except (ValueError, TypeError, CryptoError) as exc:
        raise SealError(f"box_key is not a Curve25519 public key in base64: {exc}") from None


def seal(b: Box, data: bytes) -> bytes:
    return bytes(b.encrypt(data))


def unseal(b: Box, data: bytes) -> bytes:
    try:
        return b.decrypt(data)
    except (CryptoError, ValueError, TypeError) as exc:
        raise SealError(f"a sealed message did not open: {exc}") from None


def seal_frame(b: Box, frame: JoinFrame) -> bytes:
    return seal(b, msgspec.json.encode(frame))


def unseal_frame(b: Box, data: bytes) -> JoinFrame:
    try:
        return msgspec.json.decode(unseal(b, data), type=JoinFrame)
    except msgspec.DecodeError as exc:
        raise SealError(f"a join frame did not decode: {exc}") from None
