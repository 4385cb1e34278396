"""python -m services.web"""

import argparse

from ringfence.config import listen_argument
from ringfence.contract import names
from ringfence.durations import parse_duration
from ringfence.runtime.service import run_service

from .adapter import make_adapter
from .core import DEFAULT_SESSION_TTL

DEFAULT_LISTEN = "127.0.0.1:3080"


def _ttl(text: str) -> float:
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=listen_argument, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"where the console listens (default {DEFAULT_LISTEN}; port 0 picks a free one)")
    parser.add_argument("--public-url", metavar="URL",
                        help="the console's address as browsers reach it (behind a proxy), for sign-in links")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument("--session-ttl", type=_ttl, default=DEFAULT_SESSION_TTL, metavar="DURATION",
                        help="how long a console sign-in lasts (default 8h, at most 24h)")


if __name__ == "__main__":
    reads = (names.AUDIT_STREAM, f"KV_{names.POLICY_BUCKET}", f"KV_{names.SESSIONS_BUCKET}")
    run_service("web", make_adapter, add_arguments=add_arguments, reads_only=reads)
