"""Create (or bring up to date) every JetStream stream and KV bucket.

Idempotent and safe to call from every service at start-up: whichever service
comes first creates them, the others find them as they are.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from . import names

log = logging.getLogger(__name__)

DAY = 24 * 3600
AUDIT_MAX_AGE = 7 * DAY  # the stream is transport and replay; events.log is the record
DUPLICATE_WINDOW = 10 * 60  # seconds: a re-sent event (same uid) within it is dropped
MAX_EVENT_BYTES = 1024 * 1024


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=names.AUDIT_STREAM,
            subjects=[names.AUDIT_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=AUDIT_MAX_AGE,
            max_msg_size=MAX_EVENT_BYTES,
            duplicate_window=DUPLICATE_WINDOW,
            num_replicas=replicas,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=names.RECORDINGS_STREAM,
            subjects=[names.RECORDING_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=AUDIT_MAX_AGE,
            max_msg_size=MAX_EVENT_BYTES,
            duplicate_window=DUPLICATE_WINDOW,
            num_replicas=replicas,
        ),
    ]


def bucket_configs(replicas: int = 1) -> list[KeyValueConfig]:
    return [
        KeyValueConfig(bucket=names.POLICY_BUCKET, history=5, replicas=replicas, max_value_size=64 << 20),
        KeyValueConfig(bucket=names.LOCKS_BUCKET, history=1, replicas=replicas, max_value_size=MAX_EVENT_BYTES),
        KeyValueConfig(bucket=names.SESSIONS_BUCKET, history=1, replicas=replicas, max_value_size=MAX_EVENT_BYTES),
        KeyValueConfig(
            bucket=names.LEASES_BUCKET, history=1, replicas=replicas, max_value_size=MAX_EVENT_BYTES
        ),
    ]


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    for cfg in stream_configs(replicas):
        try:
            await js.stream_info(cfg.name)
        except NotFoundError:
            try:
                await js.add_stream(cfg)
                log.info("created stream %s", cfg.name)
            except BadRequestError as exc:
                # Another service created it between our check and our add.
                if exc.err_code != 10058:  # stream name already in use
                    raise
        else:
            await js.update_stream(cfg)
    for kv in bucket_configs(replicas):
        try:
            await js.key_value(kv.bucket)
        except BucketNotFoundError:
            await js.create_key_value(kv)
            log.info("created bucket %s", kv.bucket)
        if kv.bucket in ATOMIC_BUCKETS:
            await _allow_atomic(js, f"KV_{kv.bucket}")


# Buckets whose services write several keys for one request, all or none (runtime/kv_batch.py).
ATOMIC_BUCKETS = (names.POLICY_BUCKET, names.LOCKS_BUCKET)


async def _allow_atomic(js: JetStreamContext, stream: str) -> None:
    info = await js.stream_info(stream)
    if info.config.allow_atomic:
        return
    info.config.allow_atomic = True
    try:
        updated = await js.update_stream(info.config)
    except Exception as exc:  # e.g. only the bucket's owner may reconfigure it (runtime/nats_security.py)
        log.warning("stream %s: cannot allow atomic batch publish (%r); the service that writes it will", stream, exc)
        return
    if not updated.config.allow_atomic:
        log.error("stream %s: the NATS server does not support atomic batch publish (nats-server 2.12 or later "
                  "does); requests that change several keys are then applied one key at a time", stream)
