"""Publishing audit events to JetStream, the same way from every service."""

from __future__ import annotations

import asyncio

import msgspec
from nats.js import JetStreamContext

from ..contract import names
from ..contract.events import AuditEvent, encode_event
from .service import ServiceContext

MSG_ID_HEADER = "Nats-Msg-Id"


def stamp(event: AuditEvent, ctx: ServiceContext) -> AuditEvent:
    """Fill the node fields every event carries, where the emitter left them empty."""
    event.cluster_name = event.cluster_name or ctx.config.cluster_name
    event.server_id = event.server_id or ctx.server_id
    event.server_hostname = event.server_hostname or ctx.hostname
    return event


async def publish_event(js: JetStreamContext, event: AuditEvent, timeout: float = 5.0) -> None:
    """Publish and wait for JetStream's ack. The event uid is the message id, so a
    retry after a lost ack is dropped by the stream's duplicate window."""
    await js.publish(
        names.audit_subject(event.event_type()),
        encode_event(event),
        timeout=timeout,
        headers={MSG_ID_HEADER: event.uid},
    )


class _Envelope(msgspec.Struct):
    event: str
    uid: str


_envelope = msgspec.json.Decoder(_Envelope)


async def publish_encoded(js: JetStreamContext, lines: list[bytes], timeout: float = 10.0) -> None:
    """Publish already-encoded events in order, pipelined; returns when all are acked.

    Raises on any failure; the caller re-sends the batch (uids make that safe)."""
    futures = []
    for line in lines:
        env = _envelope.decode(line)
        futures.append(
            await js.publish_async(
                names.audit_subject(env.event), line, headers={MSG_ID_HEADER: env.uid}, wait_stall=timeout
            )
        )
    await asyncio.wait_for(asyncio.gather(*futures), timeout)
