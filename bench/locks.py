"""Lock propagation: from `ringfence lock` returning until the last matching
session process is gone, with 100 sessions spread over 10 enforcer instances.

    python -m bench locks [--nodes 10] [--users 10] [--rounds 3]

Each round opens one session per (user, node) pair (users x nodes sessions),
then locks the users one by one; each lock must end that user's session on
every node. It also times one lock (a shared login) that ends all of them.
Target (issue 5): p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats

from ringfence.contract import api, names
from ringfence.contract.resources import LockTarget
from services.enforcer.uninstall import uninstall
from tests.support.nats import NatsServer
from tests.support.procs import ServiceProcess

TARGET_P99_MS = 100.0


async def lock(nc, target: LockTarget) -> None:
    """What `ringfence lock` sends; returns when the CLI would return."""
    body = msgspec.json.encode(api.LockRequest(target=target, message="benchmark"))
    msg = await nc.request(names.api_subject(names.LOCKS_API, "lock"), body, timeout=10)
    reply = msgspec.json.decode(msg.data, type=api.ApiReply)
    if not reply.ok:
        raise RuntimeError(reply.error)


async def unlock_all(nc) -> None:
    msg = await nc.request(names.api_subject(names.LOCKS_API, "get"),
                           msgspec.json.encode(api.GetRequest(kind="lock")), timeout=10)
    for item in msgspec.json.decode(msgspec.json.decode(msg.data, type=api.ApiReply).result):
        await nc.request(names.api_subject(names.LOCKS_API, "delete"),
                         msgspec.json.encode(api.DeleteRequest(kind="lock", name=item["metadata"]["name"])),
                         timeout=10)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def gone(pids: list[int], timeout: float = 10) -> float:
    start = time.perf_counter()
    while any(alive(p) for p in pids):
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{sum(alive(p) for p in pids)} session processes still alive after {timeout}s")
        await asyncio.sleep(0.0005)
    return time.perf_counter() - start


def open_sessions(data_dirs: list[Path], users: int, login: str) -> dict[str, list[subprocess.Popen]]:
    """One `sleep` session per (user, node); returns user -> processes."""
    by_user: dict[str, list[subprocess.Popen]] = {}
    procs = []
    for u in range(users):
        for d in data_dirs:
            p = subprocess.Popen([sys.executable, "-m", "ringfence.cli.main", "run", "--data-dir", str(d),
                                  "--user", f"user{u}", "--login", login, "--", "sleep", "600"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            by_user.setdefault(f"user{u}", []).append(p)
            procs.append(p)
    return by_user


def session_pids(procs: list[subprocess.Popen]) -> list[int]:
    """The `sleep` processes (children of `ringfence run`), once each session is up."""
    pids = []
    deadline = time.monotonic() + 60
    for p in procs:
        while True:
            children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
            kids = children.read_text().split() if children.exists() else []
            if kids:
                pids.append(int(kids[0]))
                break
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"session {p.args} did not start")
            time.sleep(0.01)
    return pids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="ringfence-bench-locks-"))
    work.chmod(0o755)
    server = NatsServer(work / "nats").start()
    nodes = [f"benchlock{uuid.uuid4().hex[:6]}" for _ in range(args.nodes)]
    data_dirs = [work / n for n in nodes]
    env = {"RINGFENCE_OPERATOR_AUTH": "off"}
    procs = [ServiceProcess("locks", server.url, work / "locks", env=env).start()]
    procs += [ServiceProcess("enforcer", server.url, d, "--nodename", n, env=env).start()
              for n, d in zip(nodes, data_dirs, strict=True)]
    login = "nobody"
    try:
        for p in procs:
            p.wait_ready(120)
        nc = await nats.connect(server.url)
        per_user, everyone = [], []
        for _ in range(args.rounds):
            by_user = open_sessions(data_dirs, args.users, login)
            pids = {u: session_pids(ps) for u, ps in by_user.items()}
            for user, user_pids in pids.items():
                await lock(nc, LockTarget(user=user))
                per_user.append(await gone(user_pids) * 1000)
            await unlock_all(nc)
            by_user = open_sessions(data_dirs, args.users, login)
            all_pids = [pid for ps in by_user.values() for pid in session_pids(ps)]
            await lock(nc, LockTarget(login=login))
            everyone.append(await gone(all_pids) * 1000)
            await unlock_all(nc)
        await nc.close()
        sessions = args.users * args.nodes
        print(f"{sessions} sessions over {args.nodes} enforcers, {args.rounds} rounds")
        print(f"lock one user ({args.nodes} sessions on {args.nodes} nodes), {len(per_user)} locks: "
              f"p50 {percentile(per_user, 0.5):.1f} ms, p99 {percentile(per_user, 0.99):.1f} ms, "
              f"max {max(per_user):.1f} ms")
        print(f"lock all {sessions} sessions at once, {len(everyone)} locks: "
              f"p50 {percentile(everyone, 0.5):.1f} ms, max {max(everyone):.1f} ms")
        p99 = percentile(per_user, 0.99)
        print(f"\ntarget p99 <= {TARGET_P99_MS:.0f} ms: {p99:.1f} ms {'met' if p99 <= TARGET_P99_MS else 'MISSED'}")
        return 0 if p99 <= TARGET_P99_MS else 1
    finally:
        for p in procs:
            p.stop()
        server.stop()
        for n in nodes:
            uninstall(n, kill_sessions=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench locks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    return asyncio.run(run(parser.parse_args(argv)))
