"""The NATS server's TLS certificate, made on first start when none is given.

`ringfence up --listen ADDR` off loopback and `ringfence nats-setup --tls` keep a CA and a server
certificate in <dir>: ca.pem (public: nodes pin it), ca.key and server.key (0600), and
server.pem (the server certificate followed by the CA, so a joining host receives the CA in
the handshake and checks it against its pin). A later start whose names are not all in the
certificate gets a new one from the same CA: nodes that trust the CA keep working.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..keyfiles import write_secret

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class ServerTls:
    cert: Path  # server certificate + CA
    key: Path
    ca: Path


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h and h not in ("0.0.0.0", "::")):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.unlink(missing_ok=True)
    write_secret(path, pem)


def _covers(cert_path: Path, names: list[x509.GeneralName]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return set(names) <= have and cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=30)


def ensure_server_tls(directory: Path, hosts: list[str], common_name: str = "ringfence-nats") -> ServerTls:
    """A CA (made once) and a server certificate naming every host in `hosts` (IPs or DNS names)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = ServerTls(directory / "server.pem", directory / "server.key", directory / "ca.pem")
    ca_key_path = directory / "ca.key"
    names = _names(hosts)
    now = dt.datetime.now(dt.UTC)
    if not paths.ca.exists() or not ca_key_path.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
        ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False),
                             critical=True)
              .sign(ca_key, hashes.SHA256()))
        _write_key(ca_key_path, ca_key)
        paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        paths.cert.unlink(missing_ok=True)
    if _covers(paths.cert, names) and paths.key.exists():
        return paths
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    _write_key(paths.key, key)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + paths.ca.read_bytes())
    return paths


def tls_block(tls: ServerTls, *, verify_clients: bool = False) -> str:
    """nats-server.conf `tls {}` for the client port (or a cluster's routes, inside `cluster {}`)."""
    verify = f'  ca_file: "{tls.ca}"\n  verify: true\n' if verify_clients else ""
    return f'tls {{\n  cert_file: "{tls.cert}"\n  key_file: "{tls.key}"\n{verify}  timeout: 5\n}}\n'
