"""Issue 7: Ringfence on a three-node NATS JetStream cluster keeps its promises when a node dies.

Real parts: three nats-server processes routed into one cluster (random ports, temp
stores), the policy, locks and audit services and an enforcer, all given the three
URLs and nats_replicas 3. Under steady load (a restricted session making denied
connects every 50 ms, policy changes and lock/unlock through the real CLI) the node
the audit service is connected to is SIGKILLed. Then:

- no audit event is lost or written twice: every denial the session saw is in
  events.log exactly once, in order, ei contiguous; every lock the CLI created has
  exactly one lock.created;
- changes still propagate: a policy change applies at the enforcer, a new lock
  ends a matching session;
- the services reconnect by themselves: `ringfence status` lists all four.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from services.enforcer.uninstall import uninstall
from tests.support.enforcer import NETPROBE, EnforcerNode
from tests.support.nats import NatsCluster
from tests.support.procs import ROOT, ServiceProcess, wait_for
from tests.test_restricted_e2e import log_events

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(150)]

ENV = {"RINGFENCE_OPERATOR_AUTH": "off", "RINGFENCE_NATS_REPLICAS": "3"}
TARGET = "tcp:127.0.0.5:9"
LOOP_SECONDS = 20.0  # the denied-connect session
KILL_AFTER = 5.0  # seconds of load before the kill
LOAD_AFTER_KILL = 6.0  # and after it

POLICY = """\
kind: network_restrictions
version: v4
metadata:
  name: network-restrictions
spec:
  allow:
    - cidr: 127.0.0.0/8
  deny:
    - cidr: 127.0.0.5
{extra}"""


def policy_yaml(*denied: str) -> str:
    return POLICY.format(extra="".join(f"    - cidr: {d}\n" for d in denied))


def cli(url: str, *args: str, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args, "--nats-url", url], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class Load(threading.Thread):
    """Repeats `step(i)` (one CLI operation) until stopped; records (start, end, ok, detail)."""

    def __init__(self, name: str, step) -> None:
        super().__init__(name=name, daemon=True)
        self.step = step
        self.results: list[tuple[float, float, bool, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            started = time.time()
            ok, detail = self.step(i)
            self.results.append((started, time.time(), ok, detail))
            i += 1
            self.halt.wait(0.3)

    def stop(self) -> None:
        self.halt.set()
        self.join(60)


@pytest.fixture
def cluster(tmp_path: Path):
    c = NatsCluster(tmp_path / "nats").start()
    yield c
    c.stop()


@pytest.fixture
def stack(cluster: NatsCluster, data_dir: Path):
    """policy, locks, audit and an enforcer, every one given all three URLs and replicas 3."""
    procs = [ServiceProcess(name, cluster.url, data_dir, env=ENV).start() for name in ("policy", "locks", "audit")]
    node = EnforcerNode(cluster.url, data_dir / "node0", env=ENV)
    try:
        for p in procs:
            p.wait_ready()
        node.start()
        yield {p.name: p for p in procs}, node
    finally:
        node.proc.stop()
        uninstall(node.nodename, kill_sessions=True)
        for p in reversed(procs):
            p.stop()


def pick_victim(cluster: NatsCluster, node: EnforcerNode) -> tuple[int, str]:
    """The node whose death hurts most: the audit service's and the enforcer's connections
    first, then the audit stream's and its consumer's leaders, then KV watch consumers."""
    clients = {"audit": "ringfence-audit@", "enforcer": f"ringfence-enforcer@{node.nodename}"}
    leaders = cluster.leaders()
    scores = []
    for i, n in enumerate(cluster.nodes):
        names_ = n.client_names()
        there = [who for who, prefix in clients.items() if any(c.startswith(prefix) for c in names_)]
        led = sorted(k for k, leader in leaders.items() if leader == n.name and (
            k.startswith("RINGFENCE_AUDIT") or k.startswith("KV_ringfence_policy/")
            or k.startswith("KV_ringfence_locks/")))
        score = 100 * len(there) + sum(10 if k.startswith("RINGFENCE_AUDIT") else 1 for k in led)
        scores.append((score, i, f"connected there: {there}; leader there of: {led}"))
    score, i, why = max(scores)
    assert score, "nothing of ours on any node"
    return i, why


def test_a_nats_node_dies_under_load_and_nothing_is_lost_or_doubled(cluster, stack, data_dir, tmp_path):
    services, node = stack
    url = cluster.url
    created = cli(url, "create", "-f", "-", stdin=policy_yaml())
    assert created.returncode == 0, created.stderr
    wait_for(lambda: node.probe(TARGET)[TARGET] == "eperm", 20, what="the policy at the enforcer")

    attempts_file = tmp_path / "attempts.jsonl"
    with open(attempts_file, "w") as sink:
        session = node.popen(sys.executable, NETPROBE, "--loop", str(LOOP_SECONDS), "--interval", "0.05", TARGET,
                             stdout=sink, user="chaos")
    opened = r"session (\S+) opened: local, user chaos"
    sid = wait_for(lambda: re.findall(opened, node.log()), what="the loop session")[0]

    after_kill = threading.Event()  # from then on every policy change also denies 127.0.0.7

    def change_policy(i: int):
        denied = (["127.0.0.6"] if i % 2 else []) + (["127.0.0.7"] if after_kill.is_set() else [])
        r = cli(url, "create", "-f", "-", stdin=policy_yaml(*denied))
        return r.returncode == 0, (r.stdout + r.stderr).strip()

    def lock_unlock(i: int):
        r = cli(url, "lock", f"--user=load-{i}", "--message=chaos", "--ttl=1h")
        if r.returncode != 0:
            return False, r.stderr.strip()
        name = re.search(r'Created a lock with name "([^"]+)"', r.stdout)
        u = cli(url, "unlock", f"--user=load-{i}")
        return u.returncode == 0, f"{name[1] if name else '?'} {(u.stdout + u.stderr).strip()}"

    victim_session = node.popen("sleep", "120", user="victim")
    wait_for(lambda: re.search(r"session \S+ opened: local, user victim", node.log()), what="the victim session")
    clients = {"audit": "ringfence-audit@", "policy": "ringfence-policy@", "locks": "ringfence-locks@",
               "enforcer": f"ringfence-enforcer@{node.nodename}"}
    loads = [Load("policy", change_policy), Load("locks", lock_unlock)]
    for load in loads:
        load.start()
    try:
        time.sleep(KILL_AFTER)
        victim, why = pick_victim(cluster, node)
        doomed = cluster.nodes[victim]
        on_doomed = [who for who, prefix in clients.items() if cluster.node_of(prefix) == victim]
        doomed.kill()
        killed_at = time.time()
        after_kill.set()
        print(f"\nkilled {doomed.name}: {why}")

        # Changes still propagate: a new lock ends a matching session, a policy change applies.
        locked = cli(url, "lock", "--user=victim", "--message=after the kill")
        assert locked.returncode == 0, locked.stderr
        lock_replied = time.time() - killed_at
        try:
            victim_session.wait(30)
        except subprocess.TimeoutExpired:
            victim_session.kill()
            raise AssertionError("a lock made after the kill did not end the matching session") from None
        lock_applied = time.time() - killed_at
        wait_for(lambda: node.probe("tcp:127.0.0.7:9")["tcp:127.0.0.7:9"] == "eperm", 30, 0.2,
                 what="a policy change made after the kill to apply at the enforcer")
        policy_applied = time.time() - killed_at

        # The services reconnect by themselves.
        back = {}
        for who, prefix in clients.items():
            wait_for(lambda p=prefix: cluster.node_of(p) is not None, 30, 0.05, what=f"{who} to reconnect")
            back[who] = round(time.time() - killed_at, 2)
        print(f"connected to the dead node: {on_doomed}; every client connected when checked, "
              f"{max(back.values()):.1f}s after the kill")
        time.sleep(max(0.0, killed_at + LOAD_AFTER_KILL - time.time()))  # load keeps running on two nodes
    finally:
        for load in loads:
            load.stop()

    status = cli(url, "status", "--wait", "1")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "all 4 services running" in status.stdout

    # Nothing lost, nothing doubled.
    assert session.wait(LOOP_SECONDS + 30) == 0, session.stderr.read()
    attempts = [json.loads(line) for line in attempts_file.read_text().splitlines()]
    assert {a[TARGET] for a in attempts} == {"eperm"}
    assert any(a["t"] > killed_at + 5 for a in attempts), "the session must keep going well past the kill"

    def session_events():
        events = [e for e in log_events(data_dir) if e["sid"] == sid]
        return events if events and events[-1]["event"] == "session.end" else None

    wait_for(session_events, 45, 0.2, what="every event of the session in events.log")
    time.sleep(2)  # a duplicate, if any, would arrive now
    everything = log_events(data_dir)
    events = [e for e in everything if e["sid"] == sid]
    network = [e for e in events if e["event"] == "session.network"]
    around_kill = [e for e in network if abs(_epoch(e["time"]) - killed_at) < 5]
    assert len(around_kill) > 20, "the session was making denied connects while the node died"
    assert len(network) == len(attempts), f"{len(attempts)} denials seen, {len(network)} in events.log"
    assert len({e["uid"] for e in everything}) == len(everything), "an event was written twice"
    assert [e["event"] for e in events] == ["session.start", *["session.network"] * len(network), "session.end"]
    assert [e["ei"] for e in events] == list(range(len(events))), "ei must be contiguous, in order"
    assert [e["time"] for e in network] == sorted(e["time"] for e in network), "denials out of order"

    # Every lock the CLI created was recorded once (and every unlock).
    policy_load, lock_load = loads
    created_names = [m[0] for _, _, ok, detail in lock_load.results if ok and (m := detail.split()[:1])]
    lock_events = Counter(e["name"] for e in everything if e["event"] == "lock.created")
    assert created_names and all(lock_events[n] == 1 for n in created_names), (created_names, lock_events)
    updates = sum(1 for e in everything if e["event"] == "network_restrictions.update")
    policy_ok = sum(1 for *_, ok, _ in policy_load.results if ok)
    assert updates >= policy_ok + 1  # every change that succeeded, and the first

    failures = [(round(s - killed_at, 1), round(e - s, 1), load.name, d)
                for load in loads for s, e, ok, d in load.results if not ok]
    slow = max(e - s for load in loads for s, e, _, _ in load.results)
    print(f"CLI operations: policy {policy_ok}/{len(policy_load.results)} ok, locks "
          f"{sum(1 for *_, ok, _ in lock_load.results if ok)}/{len(lock_load.results)} ok; failures "
          f"(s after kill, duration, load, message): {failures}; slowest {slow:.1f}s")
    print(f"after the kill: `lock` answered in {lock_replied:.1f}s and ended the session {lock_applied:.1f}s "
          f"after the kill; the policy change applied {policy_applied:.1f}s after it; {len(network)} denials "
          f"written, {len(around_kill)} within 5s of the kill")
    logs = {name: p.output() for name, p in services.items()} | {"enforcer": node.log()}
    reconnected = {name: [round(_log_time(t) - killed_at, 2) for t in re.findall(
        r"^(\S+ \S+) INFO \S+ ringfence.runtime.nats_conn: nats: reconnected", text, re.M)]
        for name, text in logs.items()}
    print(f"reconnected (s after the kill, from the logs): {reconnected}")
    for name in on_doomed:
        assert reconnected[name] and reconnected[name][0] < 5, f"{name} did not reconnect at once"
    for p in services.values():
        assert p.proc is not None and p.proc.poll() is None, f"{p.name} exited"


def _log_time(text: str) -> float:
    """Epoch seconds of a service log timestamp ("2026-11-21 07:53:03,813", local time)."""
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
