"""Until a deadline, retry on these errors, pause: the one way to wait out NATS not being ready.

Used wherever a request may meet a NATS cluster electing a stream leader (KV writes and
reads, audit publishing, creating the streams); the deadline is usually LEADER_WAIT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a request waits for a stream to have a leader again. On a cluster, the streams a
# dead node led get new leaders 4-9 s after it died (raft election timeouts; measured
# 3.5-7.4 s); meanwhile nothing answers their subjects and nothing is stored.
LEADER_WAIT = 12.0

RetryIf = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


async def retrying(attempt: Callable[[], Awaitable[T]], *, retry_if: RetryIf, deadline: float | None = LEADER_WAIT,
                   pause: float = 0.1, what: str | None = None, warn_every: float = 10.0) -> T:
    """`attempt()` until it returns. An error that `retry_if` accepts (exception types, or a
    predicate) is followed by `pause` seconds and another attempt, until `deadline` seconds
    have passed (None: for ever); then, or for any other error, the error is raised.

    With `what` (e.g. "writing to ringfence_locks"), the first retry logs a warning with the
    error, another follows every `warn_every` seconds, and a success after retries is logged."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    until = None if deadline is None else start + deadline
    failures = 0
    warned_at: float | None = None
    while True:
        try:
            result = await attempt()
        except Exception as exc:
            accepted = isinstance(exc, retry_if) if isinstance(retry_if, tuple) else retry_if(exc)
            now = loop.time()
            if not accepted or (until is not None and now + pause >= until):
                raise
            failures += 1
            if what and (warned_at is None or now - warned_at >= warn_every):
                warned_at = now
                limit = "until it works" if deadline is None else f"for up to {deadline:.0f}s"
                log.warning("%s: %s; retrying %s", what, _describe(exc), limit)
            await asyncio.sleep(pause)
            continue
        if failures and what:
            log.info("%s: done after %d retries (%.1fs)", what, failures, loop.time() - start)
        return result


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
