"""`ringfence events tail --durable NAME --format json`: a SIEM pipe that resumes where it
stopped. Killed mid-stream and started again it misses nothing (at least once: a repeat
is told by its uid), batch messages come out one event per line, and it works with the
CLI's own NATS credential under `ringfence up`'s permissions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nats
import pytest

from ringfence.contract import names
from ringfence.contract.batches import COUNT_HEADER, batch_msg_id, encode_batch
from ringfence.contract.events import Exec, SessionNetwork, encode_event
from ringfence.contract.streams import ensure_streams
from ringfence.runtime.audit_publish import MSG_ID_HEADER, publish_event
from tests.support.nats import TEST_NODE
from tests.support.procs import ROOT, wait_for
from tests.test_nats_security import _as, secured  # noqa: F401 - the fixture

TAIL_BATCH = 256  # ringfence/cli/events.py: events printed but not yet acked when killed, at most


class Tail:
    """`events tail --durable NAME --format json` as a subprocess, output in a file."""

    def __init__(self, url: str, name: str, out: Path, *extra: str) -> None:
        self.out, self.err = out, out.with_suffix(".err")
        with open(self.out, "w") as stdout, open(self.err, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ringfence.cli.main", "events", "tail", "--nats-url", url, "--durable", name,
                 "--format", "json", *extra], cwd=ROOT, stdout=stdout, stderr=stderr)
        wait_for(lambda: self._alive() and "following audit events with durable consumer" in self.err.read_text(),
                 15, what="tail to bind its consumer")

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"tail exited {self.proc.returncode}: {self.err.read_text()}")
        return True

    def uids(self) -> list[str]:
        lines = self.out.read_text().splitlines()
        if lines and not self.out.read_text().endswith("\n"):
            lines = lines[:-1]  # a line being written
        return [json.loads(line)["uid"] for line in lines]

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


async def _publish(url: str, events, batch: int = 0) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for e in events:
            e.server_id = e.server_id or TEST_NODE
        if batch:
            for i in range(0, len(events), batch):
                lines = [encode_event(e) for e in events[i : i + batch]]
                await js.publish(names.audit_batch_subject(TEST_NODE), encode_batch(lines),
                                 headers={COUNT_HEADER: str(len(lines)), MSG_ID_HEADER: batch_msg_id(lines)})
        else:
            for e in events:
                await publish_event(js, e)
    finally:
        await nc.close()


def test_a_durable_tail_killed_and_restarted_misses_nothing(nats_server, tmp_path):
    url = nats_server.url
    asyncio.run(_publish(url, [Exec(uid="before-the-first-run", command="not followed yet")]))
    first = Tail(url, "siem", tmp_path / "first.out")
    events = [SessionNetwork(uid=f"n{i:04d}", sid="S", dst_port=i) for i in range(1200)]

    def paced():
        for i in range(0, len(events), 20):
            asyncio.run(_publish(url, events[i : i + 20], batch=10 if i % 40 else 0))  # both wire formats
            time.sleep(0.01)

    publisher = threading.Thread(target=paced)
    publisher.start()
    try:
        wait_for(lambda: len(first.uids()) >= 200, 30, what="the first run to print 200 events")
        # Frozen, it still has a fetch outstanding: what it is handed now is never printed.
        os.kill(first.proc.pid, signal.SIGSTOP)
        time.sleep(0.5)
        first.stop(signal.SIGKILL)  # mid-stream, no goodbye
    finally:
        publisher.join()
    printed_before = first.uids()
    assert 200 <= len(printed_before) < len(events), "the kill must land mid-stream"

    second = Tail(url, "siem", tmp_path / "second.out")
    try:
        # Well within ack_wait (30 s): what the killed run was handed is read from the stream, in order.
        wait_for(lambda: set(printed_before + second.uids()) >= {e.uid for e in events}, 20,
                 what="every event across both runs")
    finally:
        second.stop()
    assert second.proc.returncode == 130
    after = second.uids()
    assert set(printed_before) | set(after) == {e.uid for e in events}  # nothing missed, nothing invented
    repeated = set(printed_before) & set(after)
    assert len(repeated) <= TAIL_BATCH  # at most the batch being printed when it was killed
    assert after[len(repeated):] == [e.uid for e in events][len(printed_before):]  # in stream order
    assert all(json.loads(line)["event"] == "session.network"
               for line in second.out.read_text().splitlines())  # one event per line


def test_durable_names_are_independent_and_checked(nats_server, tmp_path):
    url = nats_server.url
    asyncio.run(_publish(url, []))
    a, b = Tail(url, "a", tmp_path / "a.out", "--type", "exec"), Tail(url, "b", tmp_path / "b.out")
    try:
        asyncio.run(_publish(url, [Exec(uid="e1"), SessionNetwork(uid="n1"), Exec(uid="e2")], batch=3))
        wait_for(lambda: a.uids() == ["e1", "e2"] and b.uids() == ["e1", "n1", "e2"], 15, what="both followers")
    finally:
        a.stop()
        b.stop()
    bad = subprocess.run([sys.executable, "-m", "ringfence.cli.main", "events", "tail", "--nats-url", url,
                          "--durable", "my feed"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1
    assert 'ERROR: --durable: "my feed" is not a consumer name: use 1 to 48 letters, digits, "-" or "_"' in bad.stderr


def test_the_cli_credential_may_keep_its_own_durable_consumer(secured, tmp_path):  # noqa: F811
    server, seeds = secured
    tail = Tail(server.url, "siem", tmp_path / "tail.out", "--nats-nkey", seeds["cli"])
    try:
        async def emit(nc):
            await publish_event(nc.jetstream(), Exec(uid="secured-1", command="ls", server_id=TEST_NODE))

        asyncio.run(_as(server.url, seeds["enforcer"], emit))
        wait_for(lambda: tail.uids() == ["secured-1"], 15, what="the event through the CLI's own consumer")
    finally:
        tail.stop()
    assert tail.proc.returncode == 130, tail.err.read_text()

    async def delete(nc):  # reading is all it may do: no deleting consumers (the audit service's neither)
        await nc.jetstream().delete_consumer(names.AUDIT_STREAM, "tail-siem")

    with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
        asyncio.run(_as(server.url, seeds["cli"], delete))
