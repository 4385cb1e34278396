"""python -m bench [NAME [ARGS...]]: run one benchmark, or all with no NAME."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import audit, audit_kernel, cli, fleet, locks, login, recording, restricted

BENCHMARKS = {"restricted": restricted.main, "locks": locks.main, "audit": audit.main, "fleet": fleet.main,
              "cli": cli.main, "login": login.main, "audit-kernel": audit_kernel.main, "recording": recording.main}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("benchmarks:", ", ".join(BENCHMARKS))
        return 0
    if argv:
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        return BENCHMARKS[name](rest)
    failed = 0
    for name, bench in BENCHMARKS.items():
        print(f"== {name}")
        failed |= bench([])
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
