"""Which Ringfence user an SSH connection belongs to. Pure.

sshd (ExposeAuthInfo yes) tells the PAM hook how the user authenticated, in
SSH_AUTH_INFO_0, one method per line:

    publickey ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQt...
    publickey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI...

The user is the key ID of an OpenSSH user certificate signed by a CA this node
trusts (ssh_service.trusted_user_ca_keys), else the user whose registered
public keys include the key (a certificate's certified key counts), else the
login, unless ssh_service.require_registered_identity refuses the login.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ringfence.sshkeys import fingerprint

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


@dataclass(frozen=True)
class Certificate:
    key_id: str
    public_blob: bytes  # the certified public key, as a plain key blob
    signature_key: bytes  # the CA's public key blob


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def plain_key_type(cert_type: str) -> str:
    """The type of the key a certificate certifies: ssh-ed25519-cert-v01@openssh.com -> ssh-ed25519,
    sk-ssh-ed25519-cert-v01@openssh.com -> sk-ssh-ed25519@openssh.com (the FIDO types keep their suffix)."""
    plain = cert_type.replace("-cert-v01@openssh.com", "")
    return plain + "@openssh.com" if plain.startswith("sk-") else plain


def parse_certificate(key: AuthKey) -> Certificate | None:
    """An OpenSSH user certificate's key ID, certified key and CA key; None if it is not one."""
    fields = _CERT_KEY_FIELDS.get(key.key_type)
    if fields is None:
        return None
    try:
        data = base64.b64decode(key.blob, validate=True)
        cert_type, off = _read_string(data, 0)
        if cert_type.decode() != key.key_type:
            return None
        _nonce, off = _read_string(data, off)
        key_start = off
        for _ in range(fields):
            _, off = _read_string(data, off)
        plain = _string(plain_key_type(key.key_type).encode()) + data[key_start:off]
        off += 8  # serial
        (kind,) = struct.unpack_from(">I", data, off)
        off += 4
        if kind != 1:  # SSH_CERT_TYPE_USER
            return None
        key_id, off = _read_string(data, off)
        _principals, off = _read_string(data, off)
        off += 16  # valid after, valid before
        for _ in range(3):
            _, off = _read_string(data, off)  # critical options, extensions, reserved
        signature_key, off = _read_string(data, off)
        return Certificate(key_id.decode(), plain, signature_key)
    except (ValueError, struct.error, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None


def certificate_key_id(key: AuthKey) -> str | None:
    """The key ID of an OpenSSH user certificate, or None if it is not one."""
    cert = parse_certificate(key)
    return (cert.key_id or None) if cert else None


def normalize_public_key(line: str) -> tuple[str, str] | None:
    """("ssh-ed25519", "AAAA...") from an authorized_keys-style line."""
    parts = line.split()
    return (parts[0], parts[1]) if len(parts) >= 2 else None


def read_trusted_cas(text: str) -> set[bytes]:
    """CA public key blobs from a TrustedUserCAKeys-style file (one key per line, # comments)."""
    cas = set()
    for line in text.splitlines():
        key = normalize_public_key(line.strip()) if line.strip() and not line.lstrip().startswith("#") else None
        if key:
            try:
                cas.add(base64.b64decode(key[1], validate=True))
            except ValueError:
                continue
    return cas


class UnknownIdentity(ValueError):
    """require_registered_identity: nobody registered the key; the message is for the user."""


@dataclass(frozen=True)
class SshIdentity:
    user: str
    key_id: str = ""  # set when a trusted certificate named the user
    fingerprint: str = ""  # of the key used (the certified key, for a certificate)
    is_sk: bool = False
    source: str = "login"  # certificate, registered_key or login


def resolve(auth_info: str, login: str, key_owners: Mapping[tuple[str, str], str],
            trusted_cas: set[bytes] = frozenset(), require_registered: bool = False) -> SshIdentity:
    """Who logged in. A certificate's key ID counts only when a CA in `trusted_cas`
    signed it (a user can make their own CA trusted in their authorized_keys);
    otherwise the key inside it is looked up like a plain key. `key_owners` maps
    (key type, base64 blob) to the user that registered the key."""
    keys = parse_auth_info(auth_info)
    facts = {}
    for key in keys:
        cert = parse_certificate(key)
        if cert is not None:
            blob = cert.public_blob
            plain_type = plain_key_type(key.key_type)
            facts = {"fingerprint": fingerprint(blob), "is_sk": plain_type.startswith("sk-")}
            if cert.key_id and cert.signature_key in trusted_cas:
                return SshIdentity(user=cert.key_id, key_id=cert.key_id, source="certificate", **facts)
            plain = AuthKey(plain_type, base64.b64encode(blob).decode())
        else:
            plain = key
            try:
                facts = {"fingerprint": fingerprint(base64.b64decode(key.blob, validate=True)),
                         "is_sk": key.key_type.startswith("sk-")}
            except ValueError:  # binascii.Error, or text that is not base64 at all
                facts = {}
        owner = key_owners.get((plain.key_type, plain.blob))
        if owner:
            return SshIdentity(user=owner, source="registered_key", **facts)
    if require_registered:
        what = f"key {facts['fingerprint']}" if facts.get("fingerprint") else "this login's key"
        raise UnknownIdentity(f"{what} is not registered to any Ringfence user, and this node requires "
                              "one (ssh_service.require_registered_identity)")
    return SshIdentity(user=login, **facts)
