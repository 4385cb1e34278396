"""`ringfence web` (the operator console, services/web, in the foreground) and `ringfence web login`.

`web login` signs the console in as you without giving it your identity: the console offers a
fresh key, your identity signs a grant for that key (ringfence.auth.sign_grant), and the console
answers with a one-time URL that opens a console session acting as you, with your roles.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .. import auth
from ..config import listen_argument
from ..contract import api, names
from ..keyfiles import readable
from .client import CliError, call, config_from, find_identity, open_client

WEB_NATS_SEED = "nats/web.nk"  # in the data dir: the console's NATS credential `ringfence up` creates


def serve(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    argv = [sys.executable, "-m", "services.web", "--data-dir", cfg.data_dir, "--nats-url", cfg.nats_url,
            "--listen", args.listen, "--session-ttl", args.session_ttl]
    seed = args.nats_nkey or os.environ.get("RINGFENCE_NATS_NKEY")
    if not seed and readable(Path(cfg.data_dir) / WEB_NATS_SEED):
        seed = str(Path(cfg.data_dir) / WEB_NATS_SEED)
    for flag, value in (("--config", args.config), ("--nats-nkey", seed), ("--public-url", args.public_url),
                        ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if value:
            argv += [flag, value]
    os.execv(sys.executable, argv)
    return 0  # not reached


async def login(args: argparse.Namespace) -> int:
    identity = find_identity(args, config_from(args))
    if identity is None:
        raise CliError("`ringfence web login` signs the console in with your operator identity, and none was "
                       "found: pass --identity FILE or RINGFENCE_IDENTITY (`ringfence users add NAME --operator` "
                       "issues one)")
    nc = await open_client(args)
    try:
        offer = await call(nc, names.api_subject(names.WEB_API, "offer"), api.ConsoleOfferRequest(),
                           api.ConsoleOffer)
        if not offer.login_subject.startswith(names.WEB_API + "."):
            raise CliError(f"the console answered with an unexpected subject {offer.login_subject!r}")
        grant = auth.sign_grant(identity, offer.session_nkey, time.time(), offer.ttl)
        result = await call(nc, offer.login_subject, api.ConsoleLoginRequest(offer=offer.offer, grant=grant),
                            api.ConsoleLoginResult)
    finally:
        await nc.close()
    print(result.url)
    print(f"(opens a console session as {identity.user} for {offer.ttl / 3600:g}h; the link works once, "
          f"within {result.expires_in:.0f}s)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "web",
        parents=[common],
        help="run the web console; `web login` prints a sign-in link",
        description="Run the operator web console (python -m services.web) in the foreground: audit events, "
        "recordings, live sessions, locks, network restrictions, users and roles in a browser. Sign in with "
        "`ringfence web login`, which prints a one-time URL. `ringfence up` starts the console too.",
    )
    p.add_argument("--listen", type=listen_argument, default="127.0.0.1:3080", metavar="HOST:PORT",
                   help="where the console listens (default 127.0.0.1:3080)")
    p.add_argument("--public-url", metavar="URL", help="the console's address as browsers reach it (behind a proxy)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--session-ttl", default="8h", metavar="DURATION", help="how long a sign-in lasts (max 24h)")
    p.set_defaults(func=serve)
    wsub = p.add_subparsers(dest="web_command", metavar="SUBCOMMAND")
    lp = wsub.add_parser("login", parents=[common], help="print a one-time URL that signs the console in as you",
                         description=__doc__.split("\n\n", 1)[1].strip())
    lp.set_defaults(func=login)
