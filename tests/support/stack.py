"""A whole stack as an operator starts it: `ringfence up` in a temporary data dir on a free
port, with a node name of its own; the CLI finds it through the data dir alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from ringfence.contract.names import SERVICES
from services.enforcer.uninstall import uninstall

from .nats import free_port
from .procs import ROOT, wait_for

RINGFENCE = [sys.executable, "-m", "ringfence.cli.main"]


class UpStack:
    def __init__(self, workdir: Path, *extra: str, port: int | None = None) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.home = workdir / "home"  # ~/.ringfence of the operator
        self.port = port or free_port()
        self.nodename = f"up{uuid.uuid4().hex[:8]}"
        self.extra = list(extra)
        self.log_path = workdir / "up.log"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment of an operator on this node: only the data dir is named (no NATS URL)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RINGFENCE_")}
        env.update(RINGFENCE_DATA_DIR=str(self.data_dir), HOME=str(self.home),
                   PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}")
        return env

    def start(self, timeout: float = 60) -> UpStack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*RINGFENCE, "up", "--nats-port", str(self.port), "--web-listen", "127.0.0.1:0", *self.extra],
            cwd=ROOT, env={**self.env, "RINGFENCE_NODENAME": self.nodename},
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115 - owned by the process
        )
        # Discovery lists a service as soon as it registers, before its adapter has started (the
        # enforcer's socket may not exist yet): its "ready" line says it has.
        wait_for(lambda: self._check_alive() and set(re.findall(r"(\w+) service ready", self.log())) >= set(SERVICES),
                 timeout=timeout, what="every service to log that it is ready")
        wait_for(lambda: self.cli("status").returncode == 0, timeout=timeout,
                 what="`ringfence status` to list all four services")
        return self

    def _check_alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"ringfence up exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return True

    def cli(self, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*RINGFENCE, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"ringfence up did not stop within {timeout}s:\n{self.log()[-3000:]}") from None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        uninstall(self.nodename, kill_sessions=True)
