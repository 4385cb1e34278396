"""The audit log keeps the stream's order when a fetched batch never reaches the writer.

A pull consumer counts messages it handed to a fetch as delivered; if they never
arrive (the audit service killed while holding them, or the NATS node its
connection went through dying with them in flight) JetStream sends them again only
after ack_wait (30 s), and the next fetch gets the newer messages first. The
audit service notices the gap in stream sequences and reads the missing messages
from the stream before writing what came after them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

from ringfence.contract.events import SessionNetwork
from tests.support.procs import wait_for
from tests.test_audit_flow import log_lines, publish

SID = str(uuid.uuid4())


def denial(i: int) -> SessionNetwork:
    return SessionNetwork(uid=str(uuid.uuid4()), sid=SID, user="order", time=f"2026-01-01T00:00:{i:02d}.000Z",
                          dst_addr="127.0.0.5", dst_port=i, action=1)


def test_events_fetched_by_a_killed_audit_service_are_written_before_newer_ones(nats_server, data_dir, services):
    [audit] = services("audit")
    asyncio.run(publish(nats_server.url, [denial(i) for i in range(3)]))
    wait_for(lambda: len(log_lines(data_dir)) == 3, 15, what="the first events")

    # Frozen, the service still has a fetch outstanding: the next events are handed to it and stay unread.
    os.kill(audit.proc.pid, signal.SIGSTOP)
    asyncio.run(publish(nats_server.url, [denial(i) for i in range(3, 6)]))
    time.sleep(0.5)
    audit.kill()  # those three are now "delivered" to nobody; JetStream resends them after ack_wait (30 s)

    asyncio.run(publish(nats_server.url, [denial(i) for i in range(6, 9)]))
    [audit] = services("audit")
    lines = wait_for(lambda: (found := log_lines(data_dir)) and len(found) >= 9 and found, 15,
                     what="every event, the held ones included, well before ack_wait")
    assert [e["dst_port"] for e in lines] == list(range(9))
    assert [e["ei"] for e in lines] == list(range(9))
    assert "from the stream to keep the log in order" in audit.output()  # the gap was filled
    time.sleep(1)
    assert len(log_lines(data_dir)) == 9  # nothing written twice
