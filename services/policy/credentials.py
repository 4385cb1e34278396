"""Shape checks for the public credentials a user resource may carry.

Only the shape is checked (type, encoding, embedded type name, checksum): the
keys are public, and whoever verifies a signature parses them fully anyway.
"""

from __future__ import annotations

import base64
import binascii
import struct

import nkeys

# Key types OpenSSH writes into authorized_keys; the blob repeats the type name.
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


def is_openssh_public_key(text: str) -> bool:
    """`<type> <base64 blob> [comment]`, the blob starting with the same type name."""
    parts = text.split(maxsplit=2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES or "\n" in text:
        return False
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(blob) < 4:
        return False
    (name_len,) = struct.unpack(">I", blob[:4])
    return blob[4 : 4 + name_len] == parts[0].encode()


USER_NKEY_PREFIX = "U"
_NKEY_LEN = 56  # base32 of prefix byte + 32-byte key + 2-byte CRC


def is_public_user_nkey(text: str) -> bool:
    """A public user nkey (`U...`, 56 characters) whose checksum matches."""
    if len(text) != _NKEY_LEN or not text.startswith(USER_NKEY_PREFIX):
        return False
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return False
    return nkeys.crc16_checksum(raw[:-2]) == raw[-2:] and raw[0] == nkeys.PREFIX_BYTE_USER
