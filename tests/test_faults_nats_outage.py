"""Issue 7 fault: NATS unreachable for 60 s while a restricted session keeps making
denied connects. The enforcer spools every denial (services/enforcer/spool.py);
once NATS is back (same store, same port) every one reaches events.log, in order,
none twice."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from tests.support.enforcer import NETPROBE, policy, put_policy
from tests.support.procs import wait_for
from tests.test_restricted_e2e import log_events

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

NO_AUTH = {"RINGFENCE_OPERATOR_AUTH": "off"}
OUTAGE = 60.0  # seconds, as issue 7 asks
TARGET = "tcp:127.0.0.5:9"


def test_events_made_while_nats_is_down_for_60s_all_arrive_in_order_once(nats_server, data_dir, services,
                                                                          enforcer, tmp_path):
    [audit] = services("audit", env=NO_AUTH)
    node = enforcer()
    node.wait_applied(put_policy(nats_server.url, policy(["127.0.0.0/8"], ["127.0.0.5"])))

    attempts_file = tmp_path / "attempts.jsonl"
    with open(attempts_file, "w") as sink:
        # Denied connects every 0.1 s for the whole outage and a few seconds either side.
        proc = node.popen(sys.executable, NETPROBE, "--loop", str(OUTAGE + 8), "--interval", "0.1", TARGET,
                          stdout=sink, user="outage")
    try:
        opened = r"session (\S+) opened: local, user outage"
        sid = wait_for(lambda: re.findall(opened, node.log()), what="the loop session")[0]

        def denials():
            return [e for e in log_events(data_dir) if e["sid"] == sid and e["event"] == "session.network"]

        wait_for(lambda: len(denials()) >= 5, 20, what="denials reaching events.log before the outage")

        nats_server.stop()
        down_at = time.time()
        time.sleep(OUTAGE)
        written_during = len(denials())
        nats_server.start()  # the same store dir and port
        up_at = time.time()

        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    attempts = [json.loads(line) for line in attempts_file.read_text().splitlines()]
    assert {a[TARGET] for a in attempts} == {"eperm"}
    during = [a for a in attempts if down_at < a["t"] < up_at]
    assert len(during) >= OUTAGE * 5, "the session must keep trying while NATS is down"

    def session_events():
        events = [e for e in log_events(data_dir) if e["sid"] == sid]
        return events if events and events[-1]["event"] == "session.end" else None

    events = wait_for(session_events, 60, interval=0.5, what="every event of the session in events.log")
    time.sleep(2)  # a duplicate, if any, would arrive now
    events = [e for e in log_events(data_dir) if e["sid"] == sid]

    network = [e for e in events if e["event"] == "session.network"]
    assert written_during < len(network)  # the outage really held events back
    assert len(network) == len(attempts)  # nothing lost
    assert len({e["uid"] for e in events}) == len(events)  # nothing written twice
    assert [e["event"] for e in events] == ["session.start", *["session.network"] * len(network), "session.end"]
    assert [e["ei"] for e in events] == list(range(len(events)))  # in order, numbered without gaps
    assert [e["time"] for e in network] == sorted(e["time"] for e in network)  # in the order they happened
    assert all(e["user"] == "outage" and e["action"] == 1 and e["dst_addr"] == "127.0.0.5" for e in network)
    assert audit.proc is not None and audit.proc.poll() is None
    assert node.proc.proc is not None and node.proc.proc.poll() is None
