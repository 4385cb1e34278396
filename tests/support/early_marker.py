"""A KV bucket whose next watch says "caught up" too early, where nats-server's pending count
put it in the max_connections over-admission traced under load (runtime/kv_read.py).

While a key is rewritten, the server counts the removal of its old message at once and the
new message a moment later, so a message delivered in between carries num_pending one short;
at 0, nats-py marks the end of the initial values (None) before the rewritten key's new value,
whose old value the watch skipped. That window is inside the server and cannot be timed from
a client, so this puts the marker there: the rewrite and the watch are real, only the marker
comes before the rewritten key's entry instead of after it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.kv import KeyValue


class EarlyMarkerBucket:
    """`kv`, except that its next watch runs `rewrite()` (which must rewrite `key`) just before
    it starts, and delivers the "caught up" marker just before `key`'s entry."""

    def __init__(self, kv: KeyValue, key: str, rewrite: Callable[[], Awaitable[Any]]) -> None:
        self._kv = kv
        self._key = key
        self._rewrite: Callable[[], Awaitable[Any]] | None = rewrite

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    async def watch(self, keys: str, **kwargs: Any) -> Any:
        rewrite, self._rewrite = self._rewrite, None
        if rewrite is None:
            return await self._kv.watch(keys, **kwargs)
        await rewrite()
        return _MarkerBefore(await self._kv.watch(keys, **kwargs), self._key)


class _MarkerBefore:
    """A real watcher whose marker (None) is delivered just before the entry of `key`."""

    def __init__(self, watcher: KeyValue.KeyWatcher, key: str) -> None:
        self._watcher = watcher
        self._key: str | None = key
        self._held: list[Any] = []

    async def updates(self, timeout: float = 5.0) -> KeyValue.Entry | None:
        while True:
            if self._held and self._key is None:
                return self._held.pop(0)
            entry = await self._watcher.updates(timeout)
            if self._key is None:
                return entry
            if entry is not None and entry.key == self._key:
                self._held.append(entry)  # comes after the marker
            elif entry is None:
                assert self._held, f"the watch never delivered {self._key}: nothing to place the marker before"
                self._key = None
                return None
            else:
                return entry

    def __aiter__(self) -> _MarkerBefore:
        return self

    async def __anext__(self) -> KeyValue.Entry | None:
        return await self.updates()

    async def stop(self) -> None:
        await self._watcher.stop()
