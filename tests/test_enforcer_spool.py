"""The enforcer's spool against a real nats-server: batches, and lines the stream refuses."""

from __future__ import annotations

import asyncio
import json

import nats

from ringfence.contract import names
from ringfence.contract.events import SessionNetwork, encode_event
from ringfence.contract.streams import ensure_streams
from ringfence.runtime.audit_publish import publish_batches, refused_for_good
from services.enforcer.spool import MAX_LINE, Spool
from tests.support.nats import audit_events
from tests.support.procs import wait_for


def event(i: int, program: str = "curl") -> bytes:
    return encode_event(SessionNetwork(sid="s1", user="alice", program=program, dst_addr=f"127.0.0.{i % 250}"))


def run_spool(url: str, spool: Spool, until) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await ensure_streams(js)
        # The stream takes at most 8 KiB per message (an operator's setting, say).
        info = await js.stream_info(names.AUDIT_STREAM)
        info.config.max_msg_size = 8192
        await js.update_stream(info.config)
        stop = asyncio.Event()
        publish = lambda lines: publish_batches(js, "node-1", lines)  # noqa: E731
        task = asyncio.create_task(spool.run(publish, stop, refused_for_good))
        await asyncio.to_thread(until)
        stop.set()
        await task
        await nc.close()

    asyncio.run(go())


def test_lines_the_stream_refuses_are_moved_aside_and_never_block_later_ones(nats_server, tmp_path):
    spool = Spool(tmp_path / "spool")
    # Over the stream's 8 KiB (encode_event would cut the field: the line is written as is).
    too_big_for_the_stream = b'{"event":"session.network","uid":"big","program":"' + b"x" * 10_000 + b'"}'
    too_big_for_anything = b'{"event":"session.network","uid":"u"' + b" " * MAX_LINE + b"}"
    spool.append_many([event(i) for i in range(3)])
    spool.append(too_big_for_the_stream)
    spool.append(too_big_for_anything)
    spool.append_many([event(i) for i in range(3, 3000)])  # several batches' worth

    def delivered() -> bool:
        return spool.cursor == spool.path.stat().st_size

    run_spool(nats_server.url, spool, lambda: wait_for(delivered, timeout=30, what="the spool to drain"))
    events = audit_events(nats_server.url, wait=None)
    assert [e["dst_addr"] for e in events] == [f"127.0.0.{i % 250}" for i in range(3000)]
    assert spool.rejected == 2
    aside = spool.rejected_path.read_bytes().splitlines()
    assert aside == [too_big_for_the_stream, too_big_for_anything]
    assert json.loads(aside[0])["program"] == "x" * 10_000
    spool.close()
