"""The CLI's side of the control APIs: connect fast, send a request, unwrap the reply."""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeout

from ..config import Config, load_config
from ..contract.api import ApiReply
from ..runtime.nats_conn import connect

T = TypeVar("T")

REQUEST_TIMEOUT = 10.0


class CliError(Exception):
    """Printed as `ERROR: <message>`; the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def config_from(args: argparse.Namespace) -> Config:
    return load_config(
        getattr(args, "config", None),
        data_dir=getattr(args, "data_dir", None),
        nats_url=getattr(args, "nats_url", None),
    )


async def open_client(args: argparse.Namespace) -> Client:
    cfg = config_from(args)
    try:
        return await connect(cfg.nats_urls, "ringfence-cli", retry_forever=False, connect_timeout=2.0)
    except (NoServersError, OSError, TimeoutError) as exc:
        raise CliError(
            f"cannot reach NATS at {cfg.nats_url} ({exc.__class__.__name__}); "
            "is the stack running (`ringfence up`)? Use --nats-url or RINGFENCE_NATS_URL to point elsewhere"
        ) from None


async def call(nc: Client, subject: str, body: Any, result_type: type[T], timeout: float = REQUEST_TIMEOUT) -> T:
    """Send a request; return the decoded result or raise CliError with the service's message."""
    payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
    try:
        msg = await nc.request(subject, payload, timeout=timeout)
    except NoRespondersError:
        service = subject.split(".")[2] if subject.count(".") >= 2 else subject
        raise CliError(
            f"no {service} service is running (nothing answers {subject}); start it or run `ringfence up`"
        ) from None
    except NatsTimeout:
        raise CliError(f"no reply on {subject} within {timeout:.0f}s; check `ringfence status`") from None
    reply = msgspec.json.decode(msg.data, type=ApiReply)
    if not reply.ok:
        raise CliError(reply.error)
    return msgspec.json.decode(reply.result, type=result_type)
