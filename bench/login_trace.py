"""Where an SSH login's time goes, from the kernel's own timestamps (bench/login.py).

`perf record -a -k mono` of the sched fork/exec/exit tracepoints, and of
connect() with a long socket address (the enforcer's socket; IPv4 and IPv6
addresses are at most 28 bytes), while the logins run. Each login's processes
are found by ancestry (sshd's listener, the enforcer's relayd) and time
(between the ssh client's start and exit, CLOCK_MONOTONIC like perf -k mono).
"""

from __future__ import annotations

import re
import shutil
import signal
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import wait_for

EVENTS = ("sched:sched_process_fork", "sched:sched_process_exec", "sched:sched_process_exit")
LINE = re.compile(r"^\s*(?P<comm>.*?)\s+(?P<pid>\d+)/(?P<tid>\d+)\s+(?P<time>[\d.]+):"
                  r"\s+(?P<event>\S+):\s+(?P<trace>.*)$")
FIELD = re.compile(r"(\w+)[=:]\s*(\S+)")


@dataclass(frozen=True)
class Event:
    time: float
    pid: int  # the thread group
    tid: int
    kind: str  # fork, exec, exit, connect
    fields: dict[str, str]


class PerfTrace:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("perf") is not None

    def start(self) -> None:
        argv = ["perf", "record", "-q", "-a", "-k", "mono", "-o", str(self.path)]
        for event in EVENTS:
            argv += ["-e", event]
        argv += ["-e", "syscalls:sys_enter_connect", "--filter", "addrlen > 28"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # The header is written once the events are enabled.
        wait_for(lambda: self._alive() and self.path.exists() and self.path.stat().st_size > 0, 30,
                 what="perf record to start")

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"perf record exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
        return True

    def stop(self) -> list[Event]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        self.proc = None
        out = subprocess.run(["perf", "script", "-i", str(self.path), "-F", "comm,pid,tid,time,event,trace"],
                             capture_output=True, text=True, check=True).stdout
        return parse(out)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def parse(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        kind = m["event"].rpartition(":")[2].removeprefix("sched_process_").removeprefix("sys_enter_")
        events.append(Event(float(m["time"]), int(m["pid"]), int(m["tid"]), kind, dict(FIELD.findall(m["trace"]))))
    events.sort(key=lambda e: e.time)
    return events


class Timeline:
    """The processes descending from `roots`, with when each was forked, exec'd, connected and exited."""

    def __init__(self, events: list[Event], roots: set[int]) -> None:
        self.ours = set(roots)
        self.forked: dict[int, float] = {}
        self.parent: dict[int, int] = {}
        self.execs: list[tuple[float, int, str]] = []  # (time, pid, filename)
        self.connects: dict[int, list[float]] = {}
        self.exits: dict[int, float] = {}
        for e in events:
            if e.kind == "fork" and e.pid in self.ours:
                child = int(e.fields["child_pid"])
                if child != e.pid:
                    self.ours.add(child)
                    self.forked[child] = e.time
                    self.parent[child] = e.pid
            elif e.pid not in self.ours:
                continue
            elif e.kind == "exec":
                self.execs.append((e.time, e.pid, e.fields.get("filename", "")))
            elif e.kind == "connect":
                self.connects.setdefault(e.pid, []).append(e.time)
            elif e.kind == "exit" and e.pid == e.tid:
                self.exits[e.pid] = e.time

    def descends(self, pid: int, root: int) -> bool:
        while pid in self.parent:
            pid = self.parent[pid]
            if pid == root:
                return True
        return False

    def execs_within(self, root: int, start: float, end: float) -> list[tuple[float, int, str]]:
        return [x for x in self.execs if start <= x[0] <= end and self.descends(x[1], root)]

    def first_child(self, parent: int, after: float, before: float) -> int | None:
        """The first process `parent` forked between the two times (forked is in time order)."""
        return next((pid for pid, t in self.forked.items() if self.parent[pid] == parent and after <= t <= before),
                    None)

    def connect_of(self, pid: int, after: float) -> float | None:
        return next((t for t in self.connects.get(pid, []) if t >= after), None)


def is_python(filename: str) -> bool:
    return Path(filename).name.startswith("python")


# (label, start mark, end mark); a side without one of the marks shows "-".
STEPS = [
    ("ssh client start -> sshd runs the PAM hook", "start", "hook_exec"),
    ("  PAM hook: interpreter start until it connects", "hook_exec", "hook_connect"),
    ("  PAM hook: enforcer admits the connection; hook exits", "hook_connect", "hook_exit"),
    ("hook exit -> sshd starts the user's shell", "hook_exit", "shell_exec"),
    ("ssh client start -> sshd starts the user's shell", "start", "shell_exec"),
    ("  wrapper: bash + interpreter start until it connects", "shell_exec", "wrapper_connect"),
    ("  enforcer: channel admission until relayd forks the relay", "wrapper_connect", "relay_fork"),
    ("  relay: fork until the program runs", "relay_fork", "program_exec"),
    ("the program (bash -c COMMAND) runs", "program_exec", "program_exit"),
    ("  program exit -> the wrapper exits (exit status relayed)", "program_exit", "wrapper_exit"),
    ("shell/wrapper exit -> the ssh client exits", "wrapper_exit", "end"),
    ("total", "start", "end"),
]


class Breakdown:
    def __init__(self, events: list[Event], sshd: dict[str, int], relayd: int, shell: str) -> None:
        self.sshd = sshd
        self.relayd = relayd
        self.shell = shell  # the login's shell: what sshd runs (ForceCommand or the command) with -c
        self.timeline = Timeline(events, {*sshd.values(), relayd})
        self.unmatched = 0

    def marks(self, side: str, run) -> dict[str, float] | None:
        """The moments of one login (see STEPS), or None when its processes were not all seen."""
        tl = self.timeline
        conn = tl.first_child(self.sshd[side], run.start, run.end)  # sshd's process for this connection
        if conn is None:
            return None
        execs = tl.execs_within(conn, run.start, run.end)
        shell = next(((t, pid) for t, pid, name in execs if name == self.shell), None)
        if shell is None:
            return None
        marks = {"start": run.start, "end": run.end, "shell_exec": shell[0]}
        if side == "plain":
            marks.update(program_exec=shell[0], program_exit=tl.exits.get(shell[1]),
                         wrapper_exit=tl.exits.get(shell[1]))
            return marks if None not in marks.values() else None
        # pam_exec forks the hook from sshd's monitor; bash -c execs the wrapper in place.
        hook = next(((t, pid) for t, pid, name in execs if is_python(name) and tl.parent.get(pid) == conn), None)
        wrapper = next((t for t, pid, name in execs if pid == shell[1] and is_python(name)), None)
        wrapper_connect = tl.connect_of(shell[1], wrapper) if wrapper else None
        relay = tl.first_child(self.relayd, wrapper_connect, run.end) if wrapper_connect else None
        program = next(iter(tl.execs_within(relay, run.start, run.end)), None) if relay else None
        if hook is None or program is None:
            return None
        marks.update(hook_exec=hook[0], hook_connect=tl.connect_of(hook[1], hook[0]), hook_exit=tl.exits.get(hook[1]),
                     wrapper_connect=wrapper_connect, relay_fork=tl.forked[relay], program_exec=program[0],
                     program_exit=tl.exits.get(program[1]), wrapper_exit=tl.exits.get(shell[1]))
        return marks if None not in marks.values() else None

    def report(self, runs: dict[str, list], command: str) -> None:
        per_side: dict[str, list[dict[str, float]]] = {}
        for side, side_runs in runs.items():
            found = [m for m in (self.marks(side, r) for r in side_runs) if m]
            self.unmatched += len(side_runs) - len(found)
            per_side[side] = found
        counts = " and ".join(f"{len(v)} {k}" for k, v in per_side.items())
        print(f"where the time goes, ssh host {command}: median ms over the logins traced ({counts});\n"
              f"perf sched fork/exec/exit and connect() tracepoints, during the runs above:")
        print(f"{'':<60}{'without':>9}{'Ringfence':>11}")
        for label, a, b in STEPS:
            cells = []
            for side in ("plain", "ringfence"):
                spans = [(m[b] - m[a]) * 1000 for m in per_side.get(side, []) if a in m and b in m]
                cells.append(f"{statistics.median(spans):.1f}" if spans else "-")
            print(f"{label:<60}{cells[0]:>9}{cells[1]:>11}")
        if self.unmatched:
            print(f"({self.unmatched} logins whose processes the trace did not fully show are left out)")
