"""`ringfence events tail` shows the events of batch messages (the enforcer's kernel events),
filtered by type like any other."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import nats

from ringfence.contract.events import Exec, SessionNetwork, encode_event
from ringfence.contract.streams import ensure_streams
from ringfence.runtime.audit_publish import publish_batches
from tests.support.procs import ROOT, wait_for


async def publish(url: str, lines: list[bytes]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js)
    await publish_batches(js, "node-1", lines)
    await nc.close()


def test_tail_splits_batches_and_filters_their_events_by_type(nats_server, tmp_path):
    asyncio.run(publish(nats_server.url, []))
    out, err = tmp_path / "tail.out", tmp_path / "tail.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "ringfence.cli.main", "events", "tail", "--nats-url",
                                 nats_server.url, "--type", "session.network", "--format", "json"],
                                cwd=ROOT, stdout=stdout, stderr=stderr)
    try:
        wait_for(lambda: "following new audit events" in err.read_text(), 15, what="tail to subscribe")
        batch = [encode_event(SessionNetwork(uid=f"n{i}", dst_addr="127.0.0.5")) for i in range(3)]
        asyncio.run(publish(nats_server.url, [*batch[:2], encode_event(Exec(uid="x")), batch[2]]))
        wait_for(lambda: len(out.read_text().splitlines()) == 3, 10, what="the batch's network events")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [json.loads(line)["uid"] for line in out.read_text().splitlines()] == ["n0", "n1", "n2"]
