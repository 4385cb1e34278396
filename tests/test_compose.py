"""compose.yaml parses, runs NATS plus the four services, and names only real commands;
compose.cluster.yaml does the same on a three-node JetStream cluster whose nats-server
commands really form one (run here with the nats-server binary, on local ports). NATS is
safe by default: authorization and TLS from `ringfence nats-setup`, ports on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest
import yaml

from ringfence.auth import new_user_seed
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
    assert set(services) == {"nats-setup", "nats", *names.SERVICES}
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


def test_services_point_at_the_compose_nats_with_tls_and_their_own_credential():
    for name in names.SERVICES:
        env = load()["services"][name]["environment"]
        assert env["RINGFENCE_NATS_URL"] == "tls://nats:4222"
        assert env["RINGFENCE_NATS_TLS_CA"] == "/nats-setup/tls/ca.pem"
        assert env["RINGFENCE_NATS_NKEY"] == f"/nats-setup/{name}.nk"
    policy = load()["services"]["policy"]["environment"]
    assert policy["RINGFENCE_NODE_AUTH_ISSUER"] == "/nats-setup/issuer.nk"


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_no_port_is_published_on_every_interface(compose):
    for name, svc in load(compose)["services"].items():
        for mapping in svc.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name}: {mapping}"


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_nats_starts_from_the_setup_config_after_setup_finished(compose):
    services = load(compose)["services"]
    setup = services["nats-setup"]["command"]
    assert setup[:2] == ["ringfence", "nats-setup"] and flag(setup, "--dir") == "/nats-setup"
    for name, svc in services.items():
        if name.startswith("nats") and name != "nats-setup":
            assert flag(svc["command"], "--config") == "/nats-setup/nats.conf"
            assert svc["depends_on"] == {"nats-setup": {"condition": "service_completed_successfully"}}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_cluster_compose_has_three_nats_nodes_with_routes_and_jetstream_and_the_four_services():
    services = load("compose.cluster.yaml")["services"]
    assert set(services) == {"nats-setup", *NATS_NODES, *names.SERVICES, "audit2"}  # two audit services (HA)
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
        assert services[node]["volumes"] == [f"{node}-data:/data", "nats-setup:/nats-setup:ro"]  # a store of its own
        assert services[node]["image"] == load()["services"]["nats"]["image"]


def test_cluster_compose_gives_every_service_all_three_urls_and_three_replicas():
    services = load("compose.cluster.yaml")["services"]
    for name in (*names.SERVICES, "audit2"):
        env = services[name]["environment"]
        assert env["RINGFENCE_NATS_URL"].split(",") == [f"tls://{n}:4222" for n in NATS_NODES]
        assert env["RINGFENCE_NATS_REPLICAS"] == "3"
        assert set(services[name]["depends_on"]) == set(NATS_NODES)


def _setup(tmp_path, compose: str) -> Path:
    """`ringfence nats-setup` as the compose file runs it, into tmp_path, naming 127.0.0.1 too."""
    command = load(compose)["services"]["nats-setup"]["command"]
    setup = tmp_path / "setup"
    argv = [a.replace("/nats-setup", str(setup)) for a in command[1:]] + ["--tls-name", "127.0.0.1"]
    subprocess.run([sys.executable, "-m", "ringfence.cli.main", *argv], cwd=ROOT, check=True, capture_output=True)
    return setup


def test_the_cluster_compose_nats_commands_form_one_jetstream_cluster(tmp_path):
    """The three commands as written, run with the nats-server binary: hosts become 127.0.0.1,
    ports random, /data a directory each, the setup config from `ringfence nats-setup` (TLS on
    the routes); every node then sees one meta leader and three peers."""
    services = load("compose.cluster.yaml")["services"]
    setup = _setup(tmp_path, "compose.cluster.yaml")
    routes = {n: free_port() for n in NATS_NODES}
    monitors = {n: free_port() for n in NATS_NODES}
    procs = []
    try:
        for node in NATS_NODES:
            command = list(services[node]["command"])
            command[command.index("--config") + 1] = str(setup / "nats.conf")
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


def test_the_compose_nats_admits_only_its_credentials_over_tls(tmp_path):
    """compose.yaml's nats command with the config `nats-setup` wrote: no credential, a wrong one, or
    no TLS is refused; a service's credential over TLS is admitted."""
    setup = _setup(tmp_path, "compose.yaml")
    command = list(load()["services"]["nats"]["command"])
    command[command.index("--config") + 1] = str(setup / "nats.conf")
    command[command.index("--store_dir") + 1] = str(tmp_path / "data")
    port = free_port()
    proc = subprocess.Popen([nats_server_binary(), *command, "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tls = ssl.create_default_context(cafile=str(setup / "tls" / "ca.pem"))

        async def attempt(seed, use_tls=True) -> str:
            try:
                nc = await nats.connect(f"tls://127.0.0.1:{port}" if use_tls else f"nats://127.0.0.1:{port}",
                                        nkeys_seed=seed, tls=tls if use_tls else None, allow_reconnect=False,
                                        max_reconnect_attempts=1, connect_timeout=5)
                await nc.flush(timeout=6)  # a refusal may come only after the auth timeout
                await nc.close()
            except Exception as exc:
                return type(exc).__name__
            return "admitted"

        async def attempts(seeds: dict[str, tuple]) -> dict[str, str]:
            results = await asyncio.gather(*(attempt(*args) for args in seeds.values()))
            return dict(zip(seeds, results, strict=True))

        stranger = tmp_path / "stranger.nk"
        stranger.write_text(new_user_seed())
        deadline = time.monotonic() + 10
        while asyncio.run(attempt(str(setup / "policy.nk"))) != "admitted" and time.monotonic() < deadline:
            time.sleep(0.1)
        results = asyncio.run(attempts({
            "service over TLS": (str(setup / "policy.nk"),),
            "no credential": (None,),
            "no TLS": (str(setup / "policy.nk"), False),
            "unknown nkey": (str(stranger),),  # asked about through the auth callout: nobody answers here
        }))
        admitted = sorted(k for k, v in results.items() if v == "admitted")
        assert admitted == ["service over TLS"], results
    finally:
        proc.terminate()
        proc.wait(10)
