"""Waiting for something unless the service is asked to stop first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable


async def unless_stopped(stop: asyncio.Event, work: Awaitable[object]) -> bool:
    """Run `work` until it finishes (True; an exception it raises is raised here) or `stop`
    is set first (False; it is cancelled and its finally blocks run before this returns)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False
    task.result()
    return True
