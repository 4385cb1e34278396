"""Service processes started the way `ringfence up` starts them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    """Poll until `predicate()` is truthy; return its value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing waited for may raise until ready
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}" + (
        f" (last error: {last_exc!r})" if last_exc else ""))


class ServiceProcess:
    """`python -m services.<name>` with its output in <data_dir>/<name>.log."""

    def __init__(self, name: str, nats_url: str, data_dir: Path, *extra: str, env: dict | None = None) -> None:
        self.name = name
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.extra = list(extra)
        # Fixtures call services without operator identities: auth is off unless a test asks
        # for it (env={"RINGFENCE_OPERATOR_AUTH": "required"}), as tests/test_operator_auth.py does.
        self.env = {**os.environ, "RINGFENCE_LOG_LEVEL": "DEBUG", "RINGFENCE_OPERATOR_AUTH": "off", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"{name}.log"

    def start(self) -> ServiceProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}", "--nats-url", self.nats_url,
             "--data-dir", str(self.data_dir), *self.extra],
            cwd=ROOT,
            env=self.env,
            stdout=open(self.log, "ab"),  # noqa: SIM115 - owned by the process
            stderr=subprocess.STDOUT,
        )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> ServiceProcess:
        wait_for(lambda: self._check_alive() and "service ready" in self.output(), timeout,
                 what=f"{self.name} service to be ready")
        return self

    def _check_alive(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
