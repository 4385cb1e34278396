"""Prometheus metrics (ringfence/runtime/metrics.py): the exposition parses with prometheus_client's
own parser, follows its naming conventions, and moves when events flow."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request

import msgspec
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringfence.contract import names
from ringfence.runtime.metrics import families
from tests.support.nats import free_port
from tests.support.procs import ROOT, ServiceProcess, wait_for


def test_counters_and_gauges_become_ringfence_series_with_service_and_node_labels():
    counters = {"network_events": 7, "lost_network": 2, "events_published": 5, "sessions_active": 3,
                "policy_applied_ms": 1500, "requests_denied": 1}
    out = {m.name: m for m in families(counters, {"spool_age_seconds": lambda: 1.5, "broken": lambda: 1 / 0},
                                       {"service": "enforcer", "node": "n1"})}
    assert set(out) == {"ringfence_events_in", "ringfence_events_lost", "ringfence_events_out",
                        "ringfence_sessions_active", "ringfence_policy_applied_timestamp_seconds",
                        "ringfence_requests_denied", "ringfence_spool_age_seconds"}  # a failing gauge is left out
    assert out["ringfence_events_in"].type == "counter"
    [sample] = out["ringfence_events_in"].samples
    assert sample.name == "ringfence_events_in_total"
    assert sample.labels == {"service": "enforcer", "node": "n1", "source": "network"} and sample.value == 7
    assert out["ringfence_sessions_active"].type == "gauge"
    assert out["ringfence_policy_applied_timestamp_seconds"].samples[0].value == 1.5


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("ringfence_") or family.name.startswith(("python_", "process_")), family.name
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(metrics: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_endpoints_move_when_events_flow(nats_server, data_dir):
    """An enforcer (simulated kernel) makes denied-connect records; its metrics and the audit
    service's count them in, out, and into events.log; `status --stats` reads the same counters."""
    ports = {"enforcer": free_port(), "audit": free_port()}
    env = {"RINGFENCE_SIMULATE_KERNEL": "1", "RINGFENCE_NODENAME": "metrics-node"}
    procs = [ServiceProcess(name, nats_server.url, data_dir, "--metrics-listen", f"127.0.0.1:{port}", env=env).start()
             for name, port in ports.items()]
    try:
        for p in procs:
            p.wait_ready()
        before = {name: scrape(port) for name, port in ports.items()}
        assert value(before["enforcer"], "ringfence_events_in_total", source="network") == 0
        assert ("ringfence_sessions_active", (("node", "metrics-node"), ("service", "enforcer"))) in before["enforcer"]
        assert value(before["enforcer"], "ringfence_lock_view_staleness_seconds") >= 0
        assert value(before["enforcer"], "ringfence_nats_reconnects_total") == 0

        server_id = (data_dir / "host_uuid").read_text().strip()

        async def simulate():
            nc = await nats.connect(nats_server.url)
            try:
                await nc.request(names.enforcer_subject(server_id, "simulate"), msgspec.json.encode({"events": 25}),
                                 timeout=10)
            finally:
                await nc.close()

        asyncio.run(simulate())
        wait_for(lambda: value(scrape(ports["audit"]), "ringfence_events_out_total", source="audit_log") >= 25,
                 timeout=30, what="25 events written, as the audit service's metrics say")
        after = scrape(ports["enforcer"])
        assert value(after, "ringfence_events_in_total", source="network") == 25
        assert value(after, "ringfence_events_out_total", source="spool") >= 25
        assert value(after, "ringfence_spool_pending_bytes") == 0

        stats = subprocess.run([sys.executable, "-m", "ringfence.cli.main", "status", "--stats", "--format", "json",
                                "--nats-url", nats_server.url], cwd=ROOT, capture_output=True, text=True, timeout=30)
        [enforcer] = [i for i in json.loads(stats.stdout)["instances"] if i["name"] == "ringfence-enforcer"]
        data = {k: v for ep in enforcer["endpoints"] for k, v in (ep.get("data") or {}).items()}
        assert data["network_events"] == 25 and "spool_pending_bytes" in data
    finally:
        for p in procs:
            p.stop()


def test_a_metrics_port_in_use_stops_start_up_with_a_clear_error(nats_server, data_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ServiceProcess("audit", nats_server.url, data_dir, "--metrics-listen", f"127.0.0.1:{port}").start()
        try:
            code = proc.proc.wait(30)
        finally:
            proc.stop()
    assert code == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.output()


@pytest.mark.parametrize("bad", ["9464", "host:", "host:99999", ":80"])
def test_a_bad_metrics_listen_is_refused_naming_the_value(nats_server, data_dir, bad):
    proc = ServiceProcess("audit", nats_server.url, data_dir, "--metrics-listen", bad).start()
    try:
        assert proc.proc.wait(30) == 2
    finally:
        proc.stop()
    assert f'metrics_listen: "{bad}" is not HOST:PORT' in proc.output()
