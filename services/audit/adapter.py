"""NATS side of the audit service (placeholder until its issue lands)."""

from __future__ import annotations

from ringfence.runtime.service import ServiceContext


class Adapter:
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def stop(self) -> None:
        pass


def make_adapter(_args) -> Adapter:
    return Adapter()
