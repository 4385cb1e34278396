"""The fingerprint of the key an SSH connection logged in with, for `device` and
`mfa_device` locks. Pure.

`ssh-keygen -lf KEY.pub` prints `SHA256:` and the unpadded base64 of the
SHA-256 of the public key blob; for a certificate it prints the fingerprint
of the key inside it, so a lock on a key also stops every certificate of
that key. FIDO security keys (`sk-` types) are what `mfa_device` locks match.
"""

from __future__ import annotations

import base64
import binascii
import struct

from ringfence.sshkeys import fingerprint

from .ssh_identity import _CERT_KEY_FIELDS, _read_string, parse_auth_info

_CERT_SUFFIX = "-cert-v01@openssh.com"


def _plain_blob(key_type: str, blob: bytes) -> bytes:
    """The public key blob itself: for a certificate, its type without -cert and the key fields."""
    fields = _CERT_KEY_FIELDS.get(key_type)
    if fields is None:
        return blob
    _, off = _read_string(blob, 0)  # certificate type
    _, off = _read_string(blob, off)  # nonce
    start = off
    for _ in range(fields):
        _, off = _read_string(blob, off)
    plain_type = key_type.removesuffix(_CERT_SUFFIX)
    if plain_type.startswith("sk-"):
        plain_type += "@openssh.com"
    name = plain_type.encode()
    return struct.pack(">I", len(name)) + name + blob[start:off]


def login_key(auth_info: str) -> tuple[str, bool]:
    """(fingerprint, is a FIDO key) of the first key in sshd's SSH_AUTH_INFO_0; ("", False) for none."""
    for key in parse_auth_info(auth_info):
        try:
            blob = _plain_blob(key.key_type, base64.b64decode(key.blob, validate=True))
        except (binascii.Error, ValueError, struct.error):
            return "", False
        return fingerprint(blob), key.key_type.startswith("sk-")
    return "", False
