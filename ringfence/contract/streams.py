"""Create (or bring up to date) every JetStream stream and KV bucket.

Idempotent and safe to call from every service at start-up: whichever service
comes first creates them, the others find them as they are.
"""

from __future__ import annotations

import logging

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError, ServiceUnavailableError

from ..runtime.retrying import retrying
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
        KeyValueConfig(bucket=names.AUDIT_CURSOR_BUCKET, history=1, replicas=replicas, max_value_size=64),
        KeyValueConfig(bucket=names.NODE_STATUS_BUCKET, history=1, replicas=replicas, max_value_size=4096),
    ]


class StreamSetupError(Exception):
    """Streams or buckets cannot be brought to the configured shape; the message says why."""


STREAM_NAME_IN_USE = 10058  # created meanwhile by another process (maybe with another configuration)
NOT_CLUSTERED = 10074  # replicas > 1 not supported in non-clustered mode
INSUFFICIENT_RESOURCES = 10023  # not enough servers (yet) for the replicas asked
NO_SUITABLE_PEERS = 10005  # placement found too few peers (some are down or not yet known)
TEMPORARILY_UNAVAILABLE = 10008  # JetStream has no meta leader (yet)
TRANSIENT = (INSUFFICIENT_RESOURCES, NO_SUITABLE_PEERS, TEMPORARILY_UNAVAILABLE)


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create what is missing with `replicas` copies; raise existing streams and buckets to it.

    Replicas are never lowered here: a process started with a smaller setting (or an
    older one) must not quietly take copies away; lower them with the nats CLI."""
    try:
        await _ensure(js, replicas)
    except APIError as exc:
        if exc.err_code == NOT_CLUSTERED:
            raise StreamSetupError(
                f"nats_replicas is {replicas} but the NATS server is not a cluster; set nats_replicas: 1 "
                "(or RINGFENCE_NATS_REPLICAS=1), or run NATS as a cluster (`ringfence up --cluster 3`)"
            ) from None
        raise


async def _ensure(js: JetStreamContext, replicas: int) -> None:
    for cfg in stream_configs(replicas):
        try:
            info = await js.stream_info(cfg.name)
        except NotFoundError:
            try:
                await js.add_stream(cfg)
                log.info("created stream %s (%d replica%s)", cfg.name, replicas, "s" if replicas > 1 else "")
            except BadRequestError as exc:
                # Another service created it between our check and our add.
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
        else:
            had = info.config.num_replicas or 1
            cfg.num_replicas = max(had, replicas)
            # Only when something differs: a joined node's credential may read streams, not change them.
            if _differs(info.config, cfg):
                await js.update_stream(cfg)
            if cfg.num_replicas > had:
                log.info("stream %s: replicas raised from %d to %d", cfg.name, had, cfg.num_replicas)
    for kv in bucket_configs(replicas):
        try:
            await js.key_value(kv.bucket)
        except BucketNotFoundError:
            try:
                await js.create_key_value(kv)
                log.info("created bucket %s (%d replica%s)", kv.bucket, replicas, "s" if replicas > 1 else "")
            except BadRequestError as exc:
                # Another service created it between our check and our create (and may have
                # reconfigured it already, which makes the configs differ): use theirs.
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
        await _reconcile_bucket(js, f"KV_{kv.bucket}", replicas, atomic=kv.bucket in ATOMIC_BUCKETS)


async def ensure_streams_ready(js: JetStreamContext, replicas: int = 1, *, timeout: float | None = 60.0,
                               retry_every: float = 0.5) -> None:
    """ensure_streams(), retried while JetStream cannot take it yet: a cluster that has no
    meta leader yet, or fewer servers up than `replicas`. `timeout` None: wait for ever
    (warning every ~10 s). Anything else, and the last error at the deadline, is raised."""
    def not_ready(exc: BaseException) -> bool:
        if isinstance(exc, APIError):
            return _transient(exc)
        return isinstance(exc, (NoRespondersError, NatsTimeoutError, TimeoutError))

    what = (f"JetStream not ready for {replicas} replica{'s' if replicas > 1 else ''} yet (a cluster may be "
            "electing its leader or have fewer servers up than that; a server without JetStream never will "
            "be: start it with --jetstream)")
    await retrying(lambda: ensure_streams(js, replicas), retry_if=not_ready, deadline=timeout, pause=retry_every,
                   what=what)


_COMPARED = ("subjects", "retention", "storage", "max_age", "max_msg_size", "duplicate_window", "num_replicas",
             "discard")


def _differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    """A setting we ask for that the stream does not have (settings we leave open are not compared)."""
    for name in _COMPARED:
        want = getattr(wanted, name)
        if want is None:
            continue
        have = getattr(current, name)
        if isinstance(want, float) or isinstance(have, float):
            if have is None or abs(float(have) - float(want)) > 1e-3:
                return True
        elif (sorted(have or []) if name == "subjects" else have) != (sorted(want) if name == "subjects" else want):
            return True
    return False


def _transient(exc: APIError) -> bool:
    return exc.err_code in TRANSIENT or isinstance(exc, ServiceUnavailableError) or exc.code == 503


# Buckets whose services write several keys for one request, all or none (runtime/kv_batch.py).
ATOMIC_BUCKETS = (names.POLICY_BUCKET, names.LOCKS_BUCKET)


async def _reconcile_bucket(js: JetStreamContext, stream: str, replicas: int, *, atomic: bool) -> None:
    """Raise a bucket's replicas to `replicas` and allow atomic batches where it needs them, in one update."""
    info = await js.stream_info(stream)
    config = info.config
    had = config.num_replicas or 1
    wants_atomic = atomic and not config.allow_atomic
    if had >= replicas and not wants_atomic:
        return
    config.num_replicas = max(had, replicas)
    if atomic:
        config.allow_atomic = True
    try:
        updated = await js.update_stream(config)
    except (APIError, NatsTimeoutError) as exc:
        if isinstance(exc, APIError) and (exc.err_code == NOT_CLUSTERED or _transient(exc)):
            raise
        # e.g. only the bucket's owner (or `ringfence up`) may reconfigure it (runtime/nats_security.py);
        # a subject NATS does not let us publish to is not answered: a timeout, not an APIError.
        log.warning("stream %s: cannot raise replicas to %d%s (%r); the service that writes it will", stream,
                    replicas, " or allow atomic batch publish" if wants_atomic else "", exc)
        return
    if updated.config.num_replicas and updated.config.num_replicas > had:
        log.info("stream %s: replicas raised from %d to %d", stream, had, updated.config.num_replicas)
    if wants_atomic and not updated.config.allow_atomic:
        log.error("stream %s: the NATS server does not support atomic batch publish (nats-server 2.12 or later "
                  "does); requests that change several keys are then applied one key at a time", stream)
