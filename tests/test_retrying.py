"""runtime/retrying.py: until a deadline, retry on these errors, pause."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ringfence.runtime.retrying import retrying


class Flaky:
    """Fails with `errors` in turn, then returns "ok"; counts the attempts."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def run(attempt, **kw):
    return asyncio.run(retrying(attempt, pause=0.001, **kw))


@pytest.mark.parametrize(("errors", "retry_if", "deadline", "outcome", "attempts"), [
    ((), (TimeoutError,), 1.0, "ok", 1),
    ((TimeoutError(), TimeoutError()), (TimeoutError,), 1.0, "ok", 3),
    ((TimeoutError(), KeyError("k")), (TimeoutError,), 1.0, KeyError, 2),  # another error: raised at once
    ((ValueError("v"),), lambda e: "v" in str(e), 1.0, "ok", 2),  # a predicate decides
    ((ValueError("w"),), lambda e: "v" in str(e), 1.0, ValueError, 1),
    ((TimeoutError(),), (TimeoutError,), 0.0, TimeoutError, 1),  # no time left: tried once
    ((TimeoutError(),) * 5, (TimeoutError,), None, "ok", 6),  # no deadline
])
def test_retrying(errors, retry_if, deadline, outcome, attempts):
    attempt = Flaky(*errors)
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            run(attempt, retry_if=retry_if, deadline=deadline)
    else:
        assert run(attempt, retry_if=retry_if, deadline=deadline) == outcome
    assert attempt.attempts == attempts


def test_gives_up_at_the_deadline_with_the_last_error():
    async def never() -> None:
        raise TimeoutError("no leader")

    loop_time = asyncio.run(_timed(retrying(never, retry_if=(TimeoutError,), deadline=0.2, pause=0.05)))
    assert 0.1 <= loop_time <= 0.5


async def _timed(coro) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError, match="no leader"):
        await coro
    return loop.time() - start


def test_with_what_it_warns_once_with_the_reason_and_reports_success(caplog):
    caplog.set_level(logging.INFO, logger="ringfence.runtime.retrying")
    attempt = Flaky(TimeoutError("no leader yet"), TimeoutError("still none"))
    assert run(attempt, retry_if=(TimeoutError,), deadline=5, what="writing to b") == "ok"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "writing to b: TimeoutError: no leader yet; retrying for up to 5s"
    assert messages[1].startswith("writing to b: done after 2 retries")
    assert len(messages) == 2
