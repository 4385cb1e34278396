"""A real nats-server with JetStream on a random port and a temporary store."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ringfence.runtime.nats_conn import nats_server_binary, write_server_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, store: Path, port: int | None = None, extra_args: list[str] | None = None,
                 extra_conf: str = "") -> None:
        self.store = store
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.extra_conf = extra_conf  # appended to nats-server.conf, e.g. an authorization block
        self.proc: subprocess.Popen | None = None
        self.log = store / "nats.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        try:
            binary = nats_server_binary()
        except FileNotFoundError as exc:
            raise RuntimeError(f"cannot start the test NATS server: {exc}") from None
        self.store.mkdir(parents=True, exist_ok=True)
        conf = write_server_config(self.store / "nats-server.conf", store_dir=self.store, host="127.0.0.1",
                                   port=self.port, server_name=f"test-{self.port}", extra=self.extra_conf)
        self.proc = subprocess.Popen(
            [binary, "--config", str(conf), *self.extra_args],
            stdout=open(self.log, "ab"),  # noqa: SIM115 - owned by the process
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
