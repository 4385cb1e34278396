"""An enforcer node for tests: its own nodename (cgroup tree, pinned maps) and data dir."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import nats
from nats.js.errors import KeyNotFoundError

from ringfence.contract import names
from ringfence.contract.resources import CIDRRule, NetworkRestrictions, NetworkRestrictionsSpec
from services.enforcer.uninstall import uninstall

from .procs import ROOT, ServiceProcess, wait_for

NETPROBE = str(Path(__file__).with_name("netprobe.py"))
RINGFENCE = [sys.executable, "-m", "ringfence.cli.main"]


class EnforcerNode:
    def __init__(self, nats_url: str, data_dir: Path, config: str | None = None, env: dict | None = None) -> None:
        self.nodename = f"t{uuid.uuid4().hex[:10]}"
        self.data_dir = data_dir
        self.nats_url = nats_url
        extra = ["--nodename", self.nodename]
        if config:
            path = data_dir.parent / f"{self.nodename}.yaml"
            path.write_text(config)
            extra += ["--config", str(path)]
        self.proc = ServiceProcess("enforcer", nats_url, data_dir, *extra, env=env)

    def start(self) -> EnforcerNode:
        self.proc.start().wait_ready(60)
        return self

    def restart(self) -> EnforcerNode:
        return self.start()

    def log(self) -> str:
        return self.proc.output()

    def wait_applied(self, revision: int, timeout: float = 10) -> None:
        wait_for(lambda: f"revision {revision} applied" in self.log(), timeout,
                 what=f"enforcer to apply policy revision {revision}")

    def run(self, *cmd: str, user: str | None = None, login: str | None = None,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [*RINGFENCE, "run", "--data-dir", str(self.data_dir)]
        if user:
            argv += ["--user", user]
        if login:
            argv += ["--login", login]
        result = subprocess.run([*argv, "--", *cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"ringfence run failed ({result.returncode}): {result.stderr}\n{self.log()[-3000:]}")
        return result

    def popen(self, *cmd: str, user: str | None = None, login: str | None = None, stdout=subprocess.PIPE
              ) -> subprocess.Popen:
        argv = [*RINGFENCE, "run", "--data-dir", str(self.data_dir)]
        if user:
            argv += ["--user", user]
        if login:
            argv += ["--login", login]
        return subprocess.Popen([*argv, "--", *cmd], stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def probe(self, *targets: str, with_caller: bool = False, **kw) -> dict:
        """{target: result}; with_caller adds the probe's "_pid" and "_comm"."""
        out = self.run(sys.executable, NETPROBE, *targets, **kw).stdout
        result = json.loads(out.strip().splitlines()[-1])
        return result if with_caller else {k: v for k, v in result.items() if not k.startswith("_")}

    def sessions_started(self) -> list[str]:
        return re.findall(r"session (\S+) opened", self.log())

    def stop(self) -> None:
        self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()

    def cleanup(self) -> None:
        self.proc.stop()
        uninstall(self.nodename, kill_sessions=True)


def policy(allow: list[str], deny: list[str] | None = None) -> NetworkRestrictions:
    return NetworkRestrictions(
        version="v4",
        spec=NetworkRestrictionsSpec(allow=[CIDRRule(c) for c in allow], deny=[CIDRRule(c) for c in deny or []]),
    )


async def _kv(url: str, action):
    nc = await nats.connect(url.split(","))
    try:
        kv = await nc.jetstream().key_value(names.POLICY_BUCKET)
        return await action(kv)
    finally:
        await nc.close()


def put_policy(url: str, resource: NetworkRestrictions) -> int:
    """Write network_restrictions into KV as the policy service does; returns the revision."""
    return asyncio.run(_kv(url, lambda kv: kv.put(names.NETWORK_RESTRICTIONS_KEY, msgspec.json.encode(resource))))


def delete_policy(url: str) -> int:
    """Delete it as `ringfence rm` does; returns the revision of the delete marker."""

    async def delete(kv):
        await kv.delete(names.NETWORK_RESTRICTIONS_KEY)
        try:
            await kv.get(names.NETWORK_RESTRICTIONS_KEY)
        except KeyNotFoundError as exc:
            return exc.entry.revision
        raise AssertionError("network_restrictions still present after delete")

    return asyncio.run(_kv(url, delete))
