"""`ringfence nats-setup --dir DIR`: credentials, certificates and a nats-server configuration for a
NATS that `ringfence up` does not start (compose.yaml runs it once before NATS starts).

DIR gets one nkey seed per service (policy.nk, locks.nk, audit.nk, enforcer.nk, cli.nk, up.nk),
the system user and the callout issuer (sys.nk, issuer.nk; runtime/nats_security.py), tls/
(a CA and a server certificate for every --tls-name), and nats.conf: the same authorization
`ringfence up` writes (each service limited to its subjects; joined nodes through the auth
callout), TLS on the client port, and with --cluster TLS with client certificates on the
routes. Run again, it keeps the seeds and the CA and rewrites the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime import nats_security
from ..runtime.nats_conn import MAX_PAYLOAD
from ..runtime.tls_certs import ensure_server_tls, tls_block

CONF = "nats.conf"


def write_setup(directory: Path, tls_names: list[str], cluster: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    publics = nats_security.ensure_credentials(directory)
    tls = ensure_server_tls(directory / "tls", [*tls_names, "localhost", "127.0.0.1", "::1"])
    text = f"max_payload: {MAX_PAYLOAD}\n" + nats_security.authorization_block(publics) + tls_block(tls)
    if cluster:
        text += "cluster {\n" + "".join("  " + line + "\n" for line in
                                        tls_block(tls, verify_clients=True).splitlines()) + "}\n"
    path = directory / CONF
    path.write_text(text)
    path.chmod(0o600)
    return path


def run(args: argparse.Namespace) -> int:
    path = write_setup(Path(args.dir), args.tls_name or [], args.cluster)
    print(f"wrote {path}, the credentials and tls/ in {args.dir}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("nats-setup", help="credentials, certificates and config for a NATS that up does not start",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where to write them (a volume NATS and the services share)")
    p.add_argument("--tls-name", action="append", metavar="NAME",
                   help="a host name or address the NATS certificate must carry (repeatable)")
    p.add_argument("--cluster", action="store_true", help="also TLS with client certificates on cluster routes")
    p.set_defaults(func=run)
