"""Issue 7 fault: the audit service's log folder runs out of space. The service says
so (the error names the file and the reason), writes no partial line, acks nothing
it did not write, and once space is freed writes everything, each event once, with
the hash chain intact."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import subprocess
import sys
import time
import uuid

import msgspec
import nats
import pytest

from ringfence.contract import names
from ringfence.contract.auditlog import daily_files, event_lines, verify_files
from ringfence.contract.events import Exec
from services.audit.adapter import instance_id
from tests.support.procs import ROOT, wait_for
from tests.test_audit_flow import counters, publish

pytestmark = pytest.mark.timeout(120)

NO_AUTH = {"RINGFENCE_OPERATOR_AUTH": "off"}


def written_lines(log_dir) -> list[bytes]:
    return [line for f in daily_files(log_dir) for line in event_lines(f)]


def fill(path) -> int:
    """Write zeros to `path` until the filesystem is full; returns the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    total = 0
    try:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            while True:
                try:
                    total += os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return total


async def consumer_state(url: str, data_dir) -> tuple[int, int]:
    """(stream seq of the ack floor, messages delivered or waiting but not acked)."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(names.AUDIT_STREAM, names.audit_durable(instance_id(data_dir)))
        return info.ack_floor.stream_seq, info.num_ack_pending + info.num_pending
    finally:
        await nc.close()


def test_disk_full_is_reported_nothing_partial_nothing_acked_and_everything_written_after(
        nats_server, data_dir, services):
    log_dir = data_dir / "log"
    log_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0750", "ringfence-test-full", str(log_dir)],
                   check=True)
    audit = None
    try:
        [audit] = services("audit", env=NO_AUTH)
        before = [Exec(uid=str(uuid.uuid4()), command=f"before-{i}") for i in range(20)]
        asyncio.run(publish(nats_server.url, before))
        wait_for(lambda: len(written_lines(log_dir)) == 20, what="the first 20 events")
        wait_for(lambda: asyncio.run(consumer_state(nats_server.url, data_dir)) == (20, 0), what="the first 20 acked")

        filler = log_dir / "filler"
        fill(filler)
        # Each event is larger than a page, so no write fits in what the filler left.
        during = [Exec(uid=str(uuid.uuid4()), command=f"during-{i}-" + "x" * 5000) for i in range(60)]
        asyncio.run(publish(nats_server.url, during))

        def disk_full_reported():
            return [line for line in audit.output().splitlines()
                    if ("No space left on device" in line or "disk is full" in line) and str(log_dir) in line]

        [report, *_] = wait_for(disk_full_reported, 20, what="the disk-full error in the audit log")
        assert "none of it is acked" in report
        time.sleep(2.5)  # a few more attempts, all failing
        assert "Traceback" not in audit.output()

        # Nothing partial or corrupted: the 20 lines, each complete, the chain intact.
        assert len(written_lines(log_dir)) == 20
        assert all(f.read_bytes().endswith(b"\n") for f in daily_files(log_dir))
        assert verify_files(daily_files(log_dir)).broken is None
        # Nothing acked that was not written.
        assert asyncio.run(consumer_state(nats_server.url, data_dir)) == (20, 60)
        assert counters(nats_server.url)["write_errors"] >= 2

        filler.unlink()
        wait_for(lambda: len(written_lines(log_dir)) >= 80, 30, what="every event once space is back")
        wait_for(lambda: asyncio.run(consumer_state(nats_server.url, data_dir)) == (80, 0), what="every event acked")
        time.sleep(1.5)  # a redelivery, if any, would land now

        lines = [msgspec.json.decode(line) for line in written_lines(log_dir)]
        assert [e["uid"] for e in lines[:20]] == [e.uid for e in before]
        assert sorted(e["uid"] for e in lines[20:]) == sorted(e.uid for e in during)  # all, each once
        assert len(lines) == 80
        result = subprocess.run([sys.executable, "-m", "ringfence.cli.main", "events", "verify", "--data-dir",
                                 str(data_dir)], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert (result.returncode, result.stdout.strip()) == (0, "OK: 80 events verified"), result.stderr
        assert audit.proc is not None and audit.proc.poll() is None
    finally:
        if audit is not None:
            audit.stop()
        subprocess.run(["umount", str(log_dir)], check=False)
        if os.path.ismount(log_dir):
            subprocess.run(["umount", "-l", str(log_dir)], check=False)


def test_a_failed_append_is_cut_back_and_names_the_file(tmp_path):
    """The regression under the test above: a write that fails part-way leaves no partial line."""
    from services.audit.logfiles import DailyLog, RejectLog, day_number

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "ringfence-test-full", str(tmp_path)], check=True)
    try:
        daily = DailyLog(tmp_path)
        daily.open_day(day_number(dt.datetime(2024, 5, 1, tzinfo=dt.UTC)))
        path = tmp_path / daily.name
        daily.append(b'{"a":1}\n')
        with pytest.raises(OSError) as info:
            daily.append(b'{"b":"' + b"x" * 200_000 + b'"}\n')
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
        assert str(path) in str(info.value)
        assert path.read_bytes() == b'{"a":1}\n'
        rejects = RejectLog(tmp_path)
        with pytest.raises(OSError) as info:
            rejects.append(b"y" * 200_000 + b"\n")
        assert info.value.filename == str(rejects.path)
        assert rejects.path.read_bytes() == b""
    finally:
        subprocess.run(["umount", str(tmp_path)], check=False)
