"""OpenSSH public keys as operators name them: a key line, or its fingerprint. Pure."""

from __future__ import annotations

import base64
import binascii
import hashlib


def fingerprint(blob: bytes) -> str:
    """`SHA256:...` as `ssh-keygen -lf` prints it: unpadded base64 of the blob's SHA-256."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def line_fingerprint(line: str) -> str:
    """The fingerprint of an authorized_keys-style line ("ssh-ed25519 AAAA... comment"), or ""."""
    parts = line.split()
    if len(parts) < 2:
        return ""
    try:
        return fingerprint(base64.b64decode(parts[1], validate=True))
    except (binascii.Error, ValueError):
        return ""
