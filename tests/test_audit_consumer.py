"""The audit service's durable consumer: a new one for an existing log starts where the log
stopped (an upgrade from the shared `audit-writer` consumer, or a lost consumer), and a
replaced stream (sequences starting again) is read from its start, not waited on."""

from __future__ import annotations

import asyncio

import nats

from ringfence.contract import names
from ringfence.contract.events import Exec
from ringfence.contract.streams import ensure_streams
from services.audit.adapter import INSTANCE_FILE
from tests.support.procs import wait_for
from tests.test_audit_flow import line_count, log_lines, publish, restart


async def _delete(url: str, stream: str | None = None, consumer: str | None = None) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if consumer:
            await js.delete_consumer(names.AUDIT_STREAM, consumer)
        if stream:
            await js.delete_stream(stream)
            await ensure_streams(js)
    finally:
        await nc.close()


def test_a_new_consumer_for_an_existing_log_starts_where_the_log_stopped(nats_server, data_dir, services):
    [audit] = services("audit")
    asyncio.run(publish(nats_server.url, [Exec(uid=f"a{i}") for i in range(5)]))
    wait_for(lambda: line_count(data_dir) == 5, what="the first events")
    audit.stop()
    instance = (data_dir / INSTANCE_FILE).read_text().strip()
    asyncio.run(_delete(nats_server.url, consumer=names.audit_durable(instance)))
    (data_dir / INSTANCE_FILE).write_text("0123456789abcdef\n")  # as after an upgrade: a consumer never seen
    asyncio.run(publish(nats_server.url, [Exec(uid=f"b{i}") for i in range(3)]))

    restart(audit)
    wait_for(lambda: line_count(data_dir) == 8, what="the new events")
    assert "creating consumer audit-writer-0123456789abcdef at stream sequence 6" in audit.output()
    assert [e["uid"] for e in log_lines(data_dir)] == [*(f"a{i}" for i in range(5)), "b0", "b1", "b2"]


def test_a_replaced_stream_is_read_from_its_start(nats_server, data_dir, services):
    [audit] = services("audit")
    asyncio.run(publish(nats_server.url, [Exec(uid=f"a{i}") for i in range(5)]))
    wait_for(lambda: line_count(data_dir) == 5, what="the first events")
    audit.stop()
    asyncio.run(_delete(nats_server.url, stream=names.AUDIT_STREAM))  # and created again: sequences from 1
    asyncio.run(publish(nats_server.url, [Exec(uid="after-1"), Exec(uid="after-2")]))

    restart(audit)
    wait_for(lambda: line_count(data_dir) == 7, what="the events of the new stream")
    assert "it was replaced; reading all of it" in audit.output()
    assert [e["uid"] for e in log_lines(data_dir)][5:] == ["after-1", "after-2"]
