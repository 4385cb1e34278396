"""Which Ringfence user an SSH connection belongs to. Pure.

sshd (ExposeAuthInfo yes) tells the PAM hook how the user authenticated, in
SSH_AUTH_INFO_0, one method per line:

    publickey ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQt...
    publickey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI...

The user is the key ID of the OpenSSH user certificate when one was used,
else the user whose registered public keys include the key, else the login.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from dataclasses import dataclass

# Length-prefixed fields between the nonce and the serial, per certificate type
# (PROTOCOL.certkeys): the public key's own fields.
_CERT_KEY_FIELDS = {
    "ssh-ed25519-cert-v01@openssh.com": 1,
    "ssh-rsa-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": 2,
    "ssh-dss-cert-v01@openssh.com": 4,
    "sk-ssh-ed25519-cert-v01@openssh.com": 2,
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com": 3,
}


@dataclass(frozen=True)
class AuthKey:
    key_type: str
    blob: str  # base64, as in authorized_keys

    @property
    def is_certificate(self) -> bool:
        return self.key_type in _CERT_KEY_FIELDS


def parse_auth_info(text: str) -> list[AuthKey]:
    keys = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "publickey":
            keys.append(AuthKey(parts[1], parts[2]))
    return keys


def _read_string(data: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", data, off)
    off += 4
    if off + n > len(data):
        raise ValueError("truncated certificate")
    return data[off : off + n], off + n


def certificate_key_id(key: AuthKey) -> str | None:
    """The key ID of an OpenSSH user certificate, or None if it is not one."""
    fields = _CERT_KEY_FIELDS.get(key.key_type)
    if fields is None:
        return None
    try:
        data = base64.b64decode(key.blob, validate=True)
        cert_type, off = _read_string(data, 0)
        if cert_type.decode() != key.key_type:
            return None
        _nonce, off = _read_string(data, off)
        for _ in range(fields):
            _, off = _read_string(data, off)
        off += 8  # serial
        (kind,) = struct.unpack_from(">I", data, off)
        off += 4
        if kind != 1:  # SSH_CERT_TYPE_USER
            return None
        key_id, _ = _read_string(data, off)
        return key_id.decode() or None
    except (binascii.Error, ValueError, struct.error, UnicodeDecodeError):
        return None


def normalize_public_key(line: str) -> tuple[str, str] | None:
    """("ssh-ed25519", "AAAA...") from an authorized_keys-style line."""
    parts = line.split()
    return (parts[0], parts[1]) if len(parts) >= 2 else None


@dataclass(frozen=True)
class SshIdentity:
    user: str
    key_id: str = ""  # set when a certificate named the user


def resolve(auth_info: str, login: str, key_owners: Mapping[tuple[str, str], str]) -> SshIdentity:
    """`key_owners` maps (key type, base64 blob) to the user that registered the key."""
    keys = parse_auth_info(auth_info)
    for key in keys:
        key_id = certificate_key_id(key)
        if key_id:
            return SshIdentity(user=key_id, key_id=key_id)
    for key in keys:
        owner = key_owners.get((key.key_type, key.blob))
        if owner:
            return SshIdentity(user=owner)
    return SshIdentity(user=login)
