"""Enhanced recording: what an exec- and open-heavy session pays for it.

    python -m bench recording [--loops 1500] [--rounds 5]

Starts a nats-server, the audit service, an enforcer with enhanced recording
on and one (another node name) without, then times a shell loop that runs
/bin/true and `cat FILE` --loops times each: outside any session, in a session
without enhanced recording and in one with it (`ringfence run`), in turn,
--rounds times each; the loop times itself, so opening the session is not
counted. Prints the fastest run of each and its ratio to outside, and
checks that every command of the recorded runs reached events.log
(session.command lines of those sessions, or audit.events_folded counts) and
that every open of the file is counted (session.disk lines and their `count`
of repeats folded in the kernel). Also prints the CPU the enforcer, the audit
service and nats-server used while the recorded runs ran.

Target (issue 12): inside <= 1.10 x outside, every event written.
Needs root and BPF, like the enforcer.
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

from bench.audit import cpu_seconds
from tests.support.nats import NatsServer
from tests.support.procs import ServiceProcess

TARGET = 1.10
LOOP = ('s=$(date +%s%N); i=0; while [ $i -lt {n} ]; do /bin/true; cat /etc/hostname > /dev/null; '
        'i=$((i+1)); done; echo $(( $(date +%s%N) - s ))')


def written(log: Path, sids: set[str]) -> tuple[int, int, int]:
    """(commands, opens of /etc/hostname by cat, session.disk lines) of `sids` in events.log:
    commands counted one by one or in audit.events_folded summaries, opens with their `count`."""
    commands = opens = disk_lines = 0
    if not log.exists():
        return 0, 0, 0
    for line in log.read_bytes().splitlines():
        if b'"session.command"' in line or b'"audit.events_folded"' in line or b'"session.disk"' in line:
            ev = json.loads(line)
            if ev["sid"] not in sids:
                continue
            if ev["event"] == "session.disk":
                disk_lines += 1
                if ev["path"] == "/etc/hostname" and ev["program"] == "cat":
                    opens += ev.get("count", 1)
            elif ev["event"] == "session.command" or ev["source"] == "exec":
                commands += ev.get("count", 1)
    return commands, opens, disk_lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench recording", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ringfence-bench-"))
    work.chmod(0o755)
    data = work / "data"
    config = work / "ringfence.yaml"
    config.write_text("ssh_service:\n  enhanced_recording:\n    enabled: true\n")
    nodename = f"bench{work.name[-6:].replace('_', '')}"
    # A second node on this host without enhanced recording: what a session costs by itself.
    plain_data, plain_node = work / "plain", f"{nodename}p"
    server = NatsServer(work / "nats").start()
    quiet = {"RINGFENCE_LOG_LEVEL": "INFO"}
    audit = ServiceProcess("audit", server.url, data, env=quiet).start()
    enforcer = ServiceProcess("enforcer", server.url, data, "--nodename", nodename, "--config", str(config),
                              env=quiet).start()
    plain = ServiceProcess("enforcer", server.url, plain_data, "--nodename", plain_node, env=quiet).start()
    script = LOOP.format(n=args.loops)

    def run_in(directory: Path) -> list[str]:
        return [sys.executable, "-m", "ringfence.cli.main", "run", "--data-dir", str(directory), "--user", "bench",
                "--", "sh", "-c", script]

    def timed(argv: list[str]) -> float:
        return int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()[-1]) / 1e9

    try:
        for service in (audit, enforcer, plain):
            service.wait_ready(60)
        outside, session, recorded = [], [], []
        services = {"enforcer": enforcer.proc.pid, "audit": audit.proc.pid, "nats-server": server.proc.pid}
        cpu = dict.fromkeys(services, 0.0)
        for _ in range(args.rounds):
            outside.append(timed(["sh", "-c", script]))
            session.append(timed(run_in(plain_data)))
            before = {name: cpu_seconds(pid) for name, pid in services.items()}
            recorded.append(timed(run_in(data)))
            for name, pid in services.items():
                cpu[name] += cpu_seconds(pid) - before[name]
        sids = set(re.findall(r"session (\S+) opened", enforcer.output()))
        expected = args.rounds * (2 * args.loops + 1)  # the loop's commands and the shell itself
        expected_opens = args.rounds * args.loops
        deadline = time.time() + 120
        while True:
            commands, opens, disk_lines = written(data / "log" / "events.log", sids)
            if (commands >= expected and opens >= expected_opens) or time.time() > deadline:
                break
            time.sleep(0.5)
        o, p, r = min(outside), min(session), min(recorded)
        print(f"{args.loops} x (/bin/true + cat), fastest of {args.rounds}:")
        print(f"  outside any session          {o:.3f} s  1.000")
        print(f"  session, no enhanced record  {p:.3f} s  {p / o:.3f}")
        print(f"  session, enhanced recording  {r:.3f} s  {r / o:.3f}")
        print("every run, s: outside " + " ".join(f"{x:.2f}" for x in outside) + " | no enhanced " +
              " ".join(f"{x:.2f}" for x in session) + " | enhanced " + " ".join(f"{x:.2f}" for x in recorded))
        print(f"session.command events written: {commands:,} of {expected:,}")
        print(f"opens of /etc/hostname by cat counted in session.disk: {opens:,} of {expected_opens:,} "
              f"({disk_lines:,} session.disk lines in all)")
        print("CPU seconds per recorded run (while it ran): " +
              ", ".join(f"{name} {seconds / args.rounds:.2f}" for name, seconds in cpu.items()))
        ok = r / o <= TARGET and commands >= expected and opens == expected_opens
        print(f"target: enhanced recording <= {TARGET} x outside, every command and open written: "
              f"{'met' if ok else 'MISSED'}")
        return 0 if ok else 1
    finally:
        for service in (plain, enforcer, audit):
            service.stop()
        server.stop()
        from services.enforcer.uninstall import uninstall

        for node in (nodename, plain_node):
            uninstall(node, kill_sessions=True)
