"""The login key's fingerprint from SSH_AUTH_INFO_0 (what device and mfa_device locks match) is what
`ssh-keygen -lf` prints, for keys and for certificates of them."""

from __future__ import annotations

import base64
import struct
import subprocess
from pathlib import Path

import pytest

from services.enforcer import ssh_identity


def login_key(auth_info: str) -> tuple[str, bool]:
    ident = ssh_identity.resolve(auth_info, "login", {})
    return ident.fingerprint, ident.is_sk


def keygen_fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()[1]


def auth_info(pub: Path) -> str:
    key_type, blob = pub.read_text().split()[:2]
    return f"publickey {key_type} {blob}\n"


def sign(ca: Path, pub: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "alice", "-n", "root", str(pub)], check=True)
    return pub.with_name(pub.name.removesuffix(".pub") + "-cert.pub")


@pytest.fixture
def ca(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ca")], check=True)
    return tmp_path / "ca"


@pytest.mark.parametrize("key_type, bits", [("ed25519", None), ("ecdsa", "384"), ("rsa", "2048")])
def test_keys_and_their_certificates_give_the_fingerprint_ssh_keygen_prints(tmp_path, ca, key_type, bits):
    key = tmp_path / f"id_{key_type}"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, *(["-b", bits] if bits else []), "-N", "", "-f", str(key)],
                   check=True)
    pub = key.with_suffix(".pub")
    expected = keygen_fingerprint(pub)
    assert login_key(auth_info(pub)) == (expected, False)
    cert = sign(ca, pub)
    assert keygen_fingerprint(cert) == expected  # ssh-keygen -lf of a certificate: its key's fingerprint
    assert login_key(auth_info(cert)) == (expected, False)


def sk_ed25519_pub(path: Path) -> Path:
    """A FIDO ed25519 public key (made by hand: no authenticator needed to fingerprint or certify one)."""
    def string(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b
    blob = string(b"sk-ssh-ed25519@openssh.com") + string(bytes(range(32))) + string(b"ssh:")
    path.write_text(f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()} alice@laptop\n")
    return path


def test_a_fido_key_and_its_certificate_are_flagged_as_security_keys(tmp_path, ca):
    pub = sk_ed25519_pub(tmp_path / "id_ed25519_sk.pub")
    expected = keygen_fingerprint(pub)
    assert login_key(auth_info(pub)) == (expected, True)
    assert login_key(auth_info(sign(ca, pub))) == (expected, True)


@pytest.mark.parametrize("text", ["", "password\n", "publickey ssh-ed25519 !!notbase64\n"])
def test_no_key_or_a_broken_one_gives_no_fingerprint(text):
    assert login_key(text) == ("", False)
