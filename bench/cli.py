"""CLI start-up and `ringfence status` latency, against a real stack (`ringfence up`).

    python -m bench cli [--runs N]

Each command runs N times as a new process, the way an operator runs it; printed: median
and fastest wall time, and the median CPU time (user + system) of the process, which a busy
machine inflates less. Then `status` taken apart in one process: connecting to NATS (with
the CLI's credential) and service discovery.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ringfence.cli.client import open_client
from ringfence.cli.main import build_parser
from ringfence.cli.status import DISCOVERY_WAIT, discover
from tests.support.procs import ROOT
from tests.support.stack import RINGFENCE, UpStack

TARGET_STATUS = 0.300  # seconds, wall


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict, runs: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(runs):
        cpu0, t0 = _children_cpu(), time.perf_counter()
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        walls.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - cpu0)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr or result.stdout}")
    return walls, cpus


async def _phases(stack: UpStack, runs: int) -> tuple[list[float], list[float]]:
    args = build_parser().parse_args(["status", "--data-dir", str(stack.data_dir)])
    connects, discoveries = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        nc = await open_client(args)
        t1 = time.perf_counter()
        await discover(nc)
        t2 = time.perf_counter()
        await nc.close()
        connects.append(t1 - t0)
        discoveries.append(t2 - t1)
    return connects, discoveries


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cli")
    parser.add_argument("--runs", type=int, default=15)
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        stack = UpStack(Path(tmp))
        try:
            stack.start()
            env = stack.env
            cases = [
                ("python -c pass (interpreter alone)", [sys.executable, "-c", "pass"]),
                ("import ringfence.cli.main", [sys.executable, "-c", "import ringfence.cli.main"]),
                ("ringfence --version", [*RINGFENCE, "--version"]),
                ("ringfence status", [*RINGFENCE, "status"]),
                (f"ringfence status --wait {DISCOVERY_WAIT:g} (before: a fixed wait)",
                 [*RINGFENCE, "status", "--wait", str(DISCOVERY_WAIT)]),
            ]
            print(f"{'':48} {'median':>10} {'fastest':>10} {'cpu':>10}")
            status_median = 0.0
            for label, cmd in cases:
                walls, cpus = timed(cmd, env, opts.runs)
                median = statistics.median(walls)
                if label == "ringfence status":
                    status_median = median
                print(f"{label:48} {ms(median):>10} {ms(min(walls)):>10} {ms(statistics.median(cpus)):>10}")
            connects, discoveries = asyncio.run(_phases(stack, opts.runs))
            print(f"{'  status, in process: connect':48} {ms(statistics.median(connects)):>10} "
                  f"{ms(min(connects)):>10}")
            print(f"{'  status, in process: discovery':48} {ms(statistics.median(discoveries)):>10} "
                  f"{ms(min(discoveries)):>10}")
            verdict = "ok" if status_median <= TARGET_STATUS else "OVER"
            print(f"ringfence status median {ms(status_median).strip()} (target <= {TARGET_STATUS * 1000:.0f} ms): "
                  f"{verdict}")
        finally:
            stack.stop()
            stack.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
