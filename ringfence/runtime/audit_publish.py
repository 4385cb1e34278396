"""Publishing audit events to JetStream, the same way from every service."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.js import JetStreamContext

from ..contract import names
from ..contract.events import AuditEvent, encode_event
from .retrying import LEADER_WAIT, retrying
from .service import ServiceContext

log = logging.getLogger(__name__)

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
        names.audit_subject(event.server_id, event.event_type()),
        encode_event(event),
        timeout=timeout,
        headers={MSG_ID_HEADER: event.uid},
    )


# How long a control service keeps trying to publish an event before it reports it lost:
# a stream leader election after a cluster node died.
PUBLISH_WAIT = LEADER_WAIT
RETRY_PAUSE = 0.2


async def publish_event_retrying(js: JetStreamContext, event: AuditEvent, wait: float = PUBLISH_WAIT) -> None:
    """publish_event(), tried again on any failure for up to `wait` seconds (NATS reconnecting,
    the audit stream electing a leader); the last error is raised after that. Retries are
    safe: the uid is the message id, so a copy stored by an attempt whose ack was lost is
    dropped by the stream's duplicate window."""
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    await retrying(lambda: publish_event(js, event, timeout=max(0.5, min(5.0, until - loop.time()))),
                   retry_if=(Exception,), deadline=wait, pause=RETRY_PAUSE)


async def publish_change_events(ctx: ServiceContext, events: list[AuditEvent]) -> list[str]:
    """Stamp and publish, in order, the audit events of changes already applied. On failure
    the change stands: the failure is counted (audit_publish_failures) and a warning for
    the request's reply is returned, one per event not stored (the write carries its event,
    and runtime/audit_outbox.py publishes it once NATS takes it). Once one has failed after
    waiting PUBLISH_WAIT, the rest are tried once each: a request holds its service's
    write lock and must answer within the CLI's timeout."""
    warnings = []
    wait = PUBLISH_WAIT
    for event in events:
        stamp(event, ctx)
        try:
            await publish_event_retrying(ctx.js, event, wait)
        except Exception as exc:
            wait = 0.0
            ctx.counters["audit_publish_failures"] = ctx.counters.get("audit_publish_failures", 0) + 1
            log.error("audit event %s (%s) not published: %r", event.event_type(), event.uid, exc)
            warnings.append(f"warning: the change was applied but its audit event {event.event_type()} "
                            "is not recorded yet; it will be once NATS takes it")
    return warnings


class _Envelope(msgspec.Struct):
    event: str
    uid: str
    server_id: str


_envelope = msgspec.json.Decoder(_Envelope)


async def publish_encoded(js: JetStreamContext, lines: list[bytes], timeout: float = 10.0) -> None:
    """Publish already-encoded events in order, pipelined; returns when all are acked.

    Raises on any failure; the caller re-sends the batch (uids make that safe)."""
    futures = []
    for line in lines:
        env = _envelope.decode(line)
        futures.append(
            await js.publish_async(
                names.audit_subject(env.server_id, env.event), line, headers={MSG_ID_HEADER: env.uid},
                wait_stall=timeout,
            )
        )
    await asyncio.wait_for(asyncio.gather(*futures), timeout)
