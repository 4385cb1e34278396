"""compose.yaml parses, runs NATS plus the four services, and names only real commands."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from ringfence.contract import names

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_nats_with_jetstream_and_the_four_services():
    services = load()["services"]
    assert set(services) == {"nats", *names.SERVICES}
    assert "--jetstream" in services["nats"]["command"]


def test_every_command_in_compose_exists_in_the_project():
    for name, svc in load()["services"].items():
        if name == "nats":
            continue
        cmd = svc["command"]
        assert cmd[:2] == ["python", "-m"], cmd
        module = cmd[2]
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        assert importlib.util.find_spec(module + ".__main__") is not None, f"{name}: {module} is not runnable"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("ringfence", "services", "bpf"):
        assert f"COPY {path} {path}" in dockerfile


def test_enforcer_is_privileged_with_host_pid_cgroup2_and_bpffs():
    enforcer = load()["services"]["enforcer"]
    assert enforcer["privileged"] is True
    assert enforcer["pid"] == "host"
    mounts = {v.split(":")[1] for v in enforcer["volumes"]}
    assert {"/sys/fs/cgroup", "/sys/fs/bpf", "/lib/modules"} <= mounts


def test_services_point_at_the_compose_nats():
    for name in names.SERVICES:
        env = load()["services"][name]["environment"]
        assert env["RINGFENCE_NATS_URL"] == "nats://nats:4222"
