"""A real nats-server with JetStream on a random port and a temporary store, and a
three-node JetStream cluster of them (routes on random ports, one store each)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from ringfence.runtime.nats_conn import cluster_block, nats_server_binary, write_server_config

# The node a test's hand-made events and chunks come from (subjects name the publishing node).
TEST_NODE = "test-node"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, store: Path, port: int | None = None, extra_args: list[str] | None = None,
                 extra_conf: str = "", cluster: str = "", monitor_port: int | None = None) -> None:
        self.store = store
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.extra_conf = extra_conf  # appended to nats-server.conf, e.g. an authorization block
        self.cluster = cluster  # a `cluster {}` block (NatsCluster)
        self.monitor_port = monitor_port  # HTTP monitoring (/varz, /connz, /jsz) when set
        self.proc: subprocess.Popen | None = None
        self.log = store / "nats.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"test-{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, endpoint: str) -> dict:
        """GET http://127.0.0.1:<monitor_port>/<endpoint> (e.g. "connz", "jsz?consumers=true")."""
        assert self.monitor_port, "started without a monitor port"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=2) as reply:
            return json.loads(reply.read())

    def client_names(self) -> list[str]:
        """The names of the clients connected to this server right now."""
        return [c.get("name", "") for c in self.monitor("connz?limit=1024").get("connections") or []]

    def start(self) -> NatsServer:
        try:
            binary = nats_server_binary()
        except FileNotFoundError as exc:
            raise RuntimeError(f"cannot start the test NATS server: {exc}") from None
        self.store.mkdir(parents=True, exist_ok=True)
        monitor = f"http: 127.0.0.1:{self.monitor_port}\n" if self.monitor_port else ""
        conf = write_server_config(self.store / "nats-server.conf", store_dir=self.store, host="127.0.0.1",
                                   port=self.port, server_name=self.name, extra=monitor + self.extra_conf,
                                   cluster=self.cluster)
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


class NatsCluster:
    """`size` nats-servers with JetStream, routed to each other as one cluster, on random ports.

    `urls` is the comma-separated seed list services take (nats_url); `nodes[i].kill()`
    SIGKILLs one; `nodes[i].start()` brings it back with the same store and ports."""

    def __init__(self, root: Path, size: int = 3, extra_conf: str = "") -> None:
        ports = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        monitors = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(root / f"n{i + 1}", port=ports[i], extra_conf=extra_conf, monitor_port=monitors[i],
                       cluster=cluster_block(host="127.0.0.1", port=routes[i], routes=routes, name="test"))
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running node sees the same JetStream meta leader and all peers."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                metas = [node.monitor("jsz").get("meta_cluster") or {} for node in self.nodes if node.running]
                leaders = {m.get("leader") for m in metas}
                if len(leaders) == 1 and "" not in leaders and None not in leaders and all(
                        m.get("cluster_size") == len(self.nodes) for m in metas):
                    return
                last = metas
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"the NATS cluster did not elect a JetStream meta leader within {timeout}s: {last}")

    def node_of(self, client_name: str) -> int | None:
        """The index of the node a client is connected to (its connection name starts with
        `client_name`, e.g. "ringfence-audit@"), or None."""
        for i, node in enumerate(self.nodes):
            if node.running and any(n.startswith(client_name) for n in node.client_names()):
                return i
        return None

    def leaders(self) -> dict[str, str]:
        """{stream or "stream/consumer": server name of its leader}, from every running node
        (a node reports only the streams and consumers it holds a replica of)."""
        found: dict[str, str] = {}
        for node in self.nodes:
            if not node.running:
                continue
            try:
                jsz = node.monitor("jsz?streams=true&consumers=true")
            except OSError:
                continue
            for account in jsz.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if leader := (stream.get("cluster") or {}).get("leader"):
                        found[stream["name"]] = leader
                    for consumer in stream.get("consumer_detail") or []:
                        if leader := (consumer.get("cluster") or {}).get("leader"):
                            found[f"{stream['name']}/{consumer['name']}"] = leader
        return found

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def audit_events(url: str, wait: float | None = 1.0) -> list[dict]:
    """The events on the audit stream, in stream order: until none has come for `wait`
    seconds (events may still be on their way), or exactly those stored now (wait=None)."""
    import asyncio

    import nats
    from nats.errors import TimeoutError as NatsTimeout

    from ringfence.contract import names

    async def read() -> list[dict]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            total = (await js.stream_info(names.AUDIT_STREAM)).state.messages if wait is None else None
            sub = await js.subscribe(names.AUDIT_SUBJECTS, ordered_consumer=True)
            found: list[dict] = []
            while total is None or len(found) < total:
                try:
                    msg = await sub.next_msg(timeout=5 if wait is None else wait)
                except NatsTimeout:
                    if wait is None:
                        raise
                    break
                found.append(json.loads(msg.data))
            return found
        finally:
            await nc.close()

    return asyncio.run(read())
