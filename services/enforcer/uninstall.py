"""Remove a node's enforcement: programs (their pinned links), pinned maps and session cgroups.

    python -m services.enforcer.uninstall [--nodename NAME] [--config FILE] [--kill-sessions]

The enforcer leaves its programs attached when it stops, on purpose (sessions
stay restricted while it restarts); this is how an operator takes them away.
Session processes still running keep running unrestricted unless
--kill-sessions ends them first.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from ringfence.config import ConfigError, load_config

from . import bpf_sys, kernel
from .cgroups import CgroupTree
from .restricted_bpf import LEGACY_ATTACH_TYPES

log = logging.getLogger(__name__)


def uninstall(nodename: str, cgroup_path: str = "", kill_sessions: bool = False) -> list[str]:
    """Undo what an enforcer for `nodename` set up; returns what was done."""
    done: list[str] = []
    mount = kernel.find_cgroup2(cgroup_path)
    root = mount / "ringfence" / nodename
    if root.exists():
        tree = CgroupTree(mount, nodename)
        sessions = tree.existing()
        if kill_sessions:
            for sid in sessions:
                tree.kill(sid)
            deadline = time.monotonic() + 5
            while any(tree.populated(s) for s in sessions) and time.monotonic() < deadline:
                time.sleep(0.05)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:  # what enforcers of pin layout v1 attached to the node's tree
            for attach_type in LEGACY_ATTACH_TYPES:
                for prog in bpf_sys.attached_prog_ids(fd, attach_type):
                    bpf_sys.detach_prog_id(fd, attach_type, prog)
                    done.append(f"detached program {prog} from {root}")
        finally:
            os.close(fd)
        for sid in sessions:
            if not tree.populated(sid):
                tree.remove(sid)
                done.append(f"removed session cgroup {sid}")
            else:
                done.append(f"session {sid} still has processes; its cgroup stays")
        try:
            root.rmdir()
            done.append(f"removed {root}")
        except OSError as exc:
            done.append(f"kept {root}: {exc.strerror}")
    relays = mount / "ringfence" / f"{nodename}.relays"  # the session relays' cgroup (relays.py)
    if relays.exists():
        try:
            relays.rmdir()
            done.append(f"removed {relays}")
        except OSError as exc:
            done.append(f"kept {relays}: {exc.strerror}")
    pins = Path(kernel.BPFFS) / "ringfence" / nodename
    if pins.exists():
        shutil.rmtree(pins)  # the programs linked to the cgroup2 root go with their pinned links
        done.append(f"removed pinned maps and links {pins}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.enforcer.uninstall", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--nodename")
    parser.add_argument("--kill-sessions", action="store_true", help="end running sessions first")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, nodename=args.nodename)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    for line in uninstall(cfg.nodename, cfg.ssh_service.enhanced_recording.cgroup_path, args.kill_sessions):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
