"""Kernel denials to events.log, attributed: the path a port scan takes.

    python -m bench audit-kernel [--rate 20000] [--seconds 10] [--burst 100000]

Starts a nats-server, the audit service and an enforcer (real BPF), denies
127.1.0.0/16, and runs one restricted session (`ringfence run`) that sends UDP
datagrams to distinct denied address:port pairs (bench/deny_flood.c): every
one is EPERM in the kernel and one session.network event. It then waits until
events.log accounts for every denial and prints, per run:

  denials      calls the kernel refused
  attributed   session.network lines in events.log with the session's user and sid
  unattributed such lines without them
  folded       denials counted in audit.events_folded summaries of the session
  lost         denials counted in audit.events_lost (ring buffer full)
  stream rate  denials / (the enforcer's spool delivered to the audit stream - first denial)
  rate         denials / (last line written - first denial), events/s

Run 1 paces the session at --rate for --seconds: every denial must be written
one by one with its user and sid, none lost, and the trail must keep up (the
last line lands within --lag seconds of the last denial). Run 2 sends --burst
as fast as it can: its rate to events.log is the pipeline's capacity (target,
issue 12: at least 20,000/s), and every denial must still be a line, a summary
or a loss that names the session. Needs root and BPF, like the enforcer.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.enforcer import policy, put_policy
from tests.support.nats import NatsServer
from tests.support.procs import ServiceProcess, wait_for

HERE = Path(__file__).resolve().parent
TARGET_RATE = 20_000


class LogReader:
    """Reads events.log as it grows, counting what concerns one session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.counts = {"attributed": 0, "unattributed": 0, "folded": 0, "lost": 0}
        self.sid = ""

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if b'"session.network"' in line:
                ev = json.loads(line)
                if ev["dst_addr"].startswith("127.1."):
                    self.counts["attributed" if ev["sid"] == self.sid and ev["user"] else "unattributed"] += 1
            elif b'"audit.events_folded"' in line or b'"audit.events_lost"' in line:
                ev = json.loads(line)
                if ev.get("source") == "network" and ev["sid"] == self.sid:
                    key = "folded" if ev["event"] == "audit.events_folded" else "lost"
                    self.counts[key] += ev["count"] if key == "folded" else ev["lost"]

    def accounted(self) -> int:
        return sum(self.counts.values())


def flood(data: Path, binary: Path, enforcer: ServiceProcess, count: int, rate: int) -> dict:
    reader_log = data / "log" / "events.log"
    reader = LogReader(reader_log)
    reader.poll()  # skip what earlier runs wrote
    reader.counts = dict.fromkeys(reader.counts, 0)
    spool = data / "enforcer" / "spool"
    sessions_before = len(re.findall(r"session (\S+) opened", enforcer.output()))
    out = subprocess.run([sys.executable, "-m", "ringfence.cli.main", "run", "--data-dir", str(data), "--user",
                          "bench", "--", str(binary), str(count), str(rate)], capture_output=True, text=True,
                         check=True).stdout
    _calls, eperm, other, seconds, first_denial = out.split()
    started = float(first_denial)
    reader.sid = re.findall(r"session (\S+) opened", enforcer.output())[sessions_before]
    last, last_change = reader.accounted(), time.time()
    streamed = None
    while reader.accounted() < int(eperm) and time.time() - last_change < 15:
        time.sleep(0.05)
        if streamed is None and spool_delivered(spool):
            streamed = time.time()
        reader.poll()
        if reader.accounted() != last:
            last, last_change = reader.accounted(), time.time()
    finished = last_change
    return {"denials": int(eperm), **reader.counts, "flood_s": float(seconds),
            "lag": finished - started - float(seconds),
            "stream_rate": int(eperm) / max((streamed or finished) - started, 1e-9),
            "rate": int(eperm) / max(finished - started, 1e-9), "other_errors": int(other)}


def spool_delivered(spool: Path) -> bool:
    """The enforcer's spool has no line left that the audit stream has not acknowledged."""
    try:
        return int((spool / "cursor").read_text() or 0) >= (spool / "events.jsonl").stat().st_size
    except (FileNotFoundError, ValueError):
        return False


def report(name: str, r: dict) -> None:
    print(f"{name}: {r['denials']:,} denials in {r['flood_s']:.1f} s -> attributed {r['attributed']:,}, "
          f"unattributed {r['unattributed']:,}, folded {r['folded']:,}, lost {r['lost']:,}; "
          f"kernel to the audit stream {r['stream_rate']:,.0f} events/s, to events.log {r['rate']:,.0f} events/s "
          f"(last line {r['lag']:.1f} s after the last denial)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench audit-kernel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=TARGET_RATE)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--burst", type=int, default=100_000)
    parser.add_argument("--lag", type=float, default=2.0)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ringfence-bench-"))
    work.chmod(0o755)
    binary = work / "deny_flood"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(HERE / "deny_flood.c")], check=True)
    binary.chmod(0o755)
    data = work / "data"
    server = NatsServer(work / "nats").start()
    quiet = {"RINGFENCE_LOG_LEVEL": "INFO"}
    audit = ServiceProcess("audit", server.url, data, env=quiet).start()
    nodename = f"bench{work.name[-6:].replace('_', '')}"
    enforcer = ServiceProcess("enforcer", server.url, data, "--nodename", nodename, env=quiet).start()
    try:
        audit.wait_ready(60)
        enforcer.wait_ready(60)
        revision = put_policy(server.url, policy(["127.0.0.0/8"], ["127.1.0.0/16"]))
        wait_for(lambda: f"revision {revision} applied" in enforcer.output(), 30, what="the policy")
        paced = flood(data, binary, enforcer, int(args.rate * args.seconds), args.rate)
        report(f"paced at {args.rate:,}/s", paced)
        burst = flood(data, binary, enforcer, args.burst, 0)
        report("burst, as fast as possible", burst)
        kept_up = paced["attributed"] == paced["denials"] and paced["lag"] <= args.lag
        accounted = burst["unattributed"] == 0 and (
            burst["attributed"] + burst["folded"] + burst["lost"] == burst["denials"])
        ok = kept_up and accounted and burst["rate"] >= TARGET_RATE
        print(f"\ntarget: {args.rate:,}/s written one by one and attributed, keeping up (lag <= {args.lag} s): "
              f"{'met' if kept_up else 'MISSED'}; capacity to events.log >= {TARGET_RATE:,}/s: "
              f"{burst['rate']:,.0f} {'met' if burst['rate'] >= TARGET_RATE else 'MISSED'}; burst accounted "
              f"for by session: {'met' if accounted else 'MISSED'}")
        return 0 if ok else 1
    finally:
        enforcer.stop()
        audit.stop()
        server.stop()
        from services.enforcer.uninstall import uninstall

        uninstall(nodename, kill_sessions=True)
