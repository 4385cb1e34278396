"""compose.yaml parses, runs NATS plus the four services, and names only real commands;
compose.cluster.yaml does the same on a three-node JetStream cluster whose nats-server
commands really form one (run here with the nats-server binary, on local ports)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ringfence.contract import names
from ringfence.runtime.nats_conn import nats_server_binary
from tests.support.nats import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("compose.yaml", "compose.cluster.yaml")
NATS_NODES = ("nats1", "nats2", "nats3")


def load(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_has_nats_with_jetstream_and_the_four_services():
    services = load()["services"]
    assert set(services) == {"nats", *names.SERVICES}
    assert "--jetstream" in services["nats"]["command"]


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_every_command_in_compose_exists_in_the_project(compose):
    for name, svc in load(compose)["services"].items():
        if name.startswith("nats"):
            continue
        cmd = svc["command"]
        assert cmd[:2] == ["python", "-m"], cmd
        module = cmd[2]
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        assert importlib.util.find_spec(module + ".__main__") is not None, f"{name}: {module} is not runnable"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("ringfence", "services", "bpf"):
        assert f"COPY {path} {path}" in dockerfile


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_enforcer_is_privileged_with_host_pid_cgroup2_and_bpffs(compose):
    enforcer = load(compose)["services"]["enforcer"]
    assert enforcer["privileged"] is True
    assert enforcer["pid"] == "host"
    mounts = {v.split(":")[1] for v in enforcer["volumes"]}
    assert {"/sys/fs/cgroup", "/sys/fs/bpf", "/lib/modules"} <= mounts


def test_services_point_at_the_compose_nats():
    for name in names.SERVICES:
        env = load()["services"][name]["environment"]
        assert env["RINGFENCE_NATS_URL"] == "nats://nats:4222"


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_cluster_compose_has_three_nats_nodes_with_routes_and_jetstream_and_the_four_services():
    services = load("compose.cluster.yaml")["services"]
    assert set(services) == {*NATS_NODES, *names.SERVICES, "audit2"}  # two audit services (HA)
    assert services["audit2"]["command"] == services["audit"]["command"]
    assert services["audit2"]["volumes"] != services["audit"]["volumes"]  # a log of its own
    routes = {f"nats://{n}:6222" for n in NATS_NODES}
    for node in NATS_NODES:
        command = services[node]["command"]
        assert "--jetstream" in command and flag(command, "--store_dir") == "/data"
        assert flag(command, "--server_name") == node  # names unique in the cluster
        assert flag(command, "--cluster_name") == "ringfence"
        assert flag(command, "--cluster") == "nats://0.0.0.0:6222"
        assert set(flag(command, "--routes").split(",")) == routes
        assert services[node]["volumes"] == [f"{node}-data:/data"]  # a store of its own
        assert services[node]["image"] == load()["services"]["nats"]["image"]


def test_cluster_compose_gives_every_service_all_three_urls_and_three_replicas():
    services = load("compose.cluster.yaml")["services"]
    for name in (*names.SERVICES, "audit2"):
        env = services[name]["environment"]
        assert env["RINGFENCE_NATS_URL"].split(",") == [f"nats://{n}:4222" for n in NATS_NODES]
        assert env["RINGFENCE_NATS_REPLICAS"] == "3"
        assert set(services[name]["depends_on"]) == set(NATS_NODES)


def test_the_cluster_compose_nats_commands_form_one_jetstream_cluster(tmp_path):
    """The three commands as written, run with the nats-server binary: hosts become 127.0.0.1,
    ports random, /data a directory each; every node then sees one meta leader and three peers."""
    services = load("compose.cluster.yaml")["services"]
    routes = {n: free_port() for n in NATS_NODES}
    monitors = {n: free_port() for n in NATS_NODES}
    procs = []
    try:
        for node in NATS_NODES:
            command = list(services[node]["command"])
            command[command.index("--store_dir") + 1] = str(tmp_path / node)
            command[command.index("--cluster") + 1] = f"nats://127.0.0.1:{routes[node]}"
            local_routes = flag(command, "--routes")
            for peer in NATS_NODES:
                local_routes = local_routes.replace(f"nats://{peer}:6222", f"nats://127.0.0.1:{routes[peer]}")
            command[command.index("--routes") + 1] = local_routes
            argv = [nats_server_binary(), *command, "-a", "127.0.0.1", "-p", str(free_port()),
                    "-m", str(monitors[node])]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        metas: list = []
        while time.monotonic() < deadline:
            try:
                metas = [_jsz(monitors[n]).get("meta_cluster") or {} for n in NATS_NODES]
            except OSError:
                metas = []
            leaders = {m.get("leader") for m in metas}
            if metas and len(leaders) == 1 and None not in leaders and "" not in leaders and all(
                    m.get("cluster_size") == 3 for m in metas):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no JetStream cluster of three formed: {metas}")
        assert next(iter(leaders)) in NATS_NODES
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _jsz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/jsz", timeout=2) as reply:
        return json.loads(reply.read())
