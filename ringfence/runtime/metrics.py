"""Prometheus metrics for every service, from the counters it already keeps.

A service counts in `ctx.counters` (ints: `ringfence status --stats` shows them) and
registers live values in `ctx.gauges` (callables read at scrape time). With
`--metrics-listen HOST:PORT` (config `metrics_listen`, off by default) it serves them at
http://HOST:PORT/metrics, every series labelled with the service and the node:

- counters as `ringfence_<name>_total`, a few under shared names with a `source` label
  (events in, out and lost per source: SOURCES);
- gauges (GAUGES and every ctx.gauges entry) as `ringfence_<name>`;
- wall-clock milliseconds (`*_ms`) as `ringfence_<name>_timestamp_seconds`.

The exposition is produced at scrape time, so nothing here runs unless someone scrapes.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import parse_listen

log = logging.getLogger(__name__)

PREFIX = "ringfence_"

# counter name -> (metric, source): events in, out and lost, per source.
SOURCES: dict[str, tuple[str, str]] = {
    "network_events": ("events_in", "network"),
    "command_events": ("events_in", "command"),
    "disk_events": ("events_in", "disk"),
    "events_published": ("events_out", "spool"),
    "written": ("events_out", "audit_log"),
    "lost_network": ("events_lost", "network"),
    "lost_exec": ("events_lost", "command"),
    "lost_disk": ("events_lost", "disk"),
}
# Counters that are levels, not running totals.
GAUGES = {"sessions_active", "policy_revision", "policy_entries", "locks_known", "recording_chunks_held"}
HELP = {
    "events_in": "Audit events produced on this node, by source (kernel records)",
    "events_out": "Audit events delivered: published from the spool (enforcer) or written to events.log (audit)",
    "events_lost": "Kernel records dropped because a ring buffer was full, by source",
    "sessions_active": "Sessions running on this node",
    "policy_revision": "Revision of the network_restrictions resource applied",
    "spool_pending_bytes": "Audit events waiting in the spool to be published",
    "spool_age_seconds": "How long the spool has held undelivered events (0: empty)",
    "lock_view_staleness_seconds": "Seconds since the lock view was last confirmed current",
    "policy_apply_seconds": "How long the last policy change took to apply to the kernel maps",
    "leases_held": "max_connections leases this node holds",
    "recording_bytes": "Bytes of session recording shipped",
    "nats_reconnects": "Times the NATS connection was re-established",
}
_NAME = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class _Family:
    metric: Metric
    labels: tuple[str, ...]


def families(counters: dict[str, int], gauges: dict[str, Callable[[], float]], labels: dict[str, str]
             ) -> list[Metric]:
    """The exposition of one service's counters and gauges (pure apart from calling the gauges)."""
    keys = tuple(labels)
    values = tuple(labels.values())
    out: dict[str, _Family] = {}

    def family(name: str, kind: type, extra: tuple[str, ...] = ()) -> _Family:
        name = _NAME.sub("_", name)
        if name not in out:
            doc = HELP.get(name, f"Ringfence {name.replace('_', ' ')}")
            out[name] = _Family(kind(PREFIX + name, doc, labels=keys + extra), keys + extra)
        return out[name]

    for name, value in sorted(counters.items()):
        if name in SOURCES:
            metric, source = SOURCES[name]
            family(metric, CounterMetricFamily, ("source",)).metric.add_metric((*values, source), value)
        elif name.endswith("_ms"):
            family(name[:-3] + "_timestamp_seconds", GaugeMetricFamily).metric.add_metric(values, value / 1000)
        elif name in GAUGES:
            family(name, GaugeMetricFamily).metric.add_metric(values, value)
        else:
            family(name, CounterMetricFamily).metric.add_metric(values, value)
    for name, read in sorted(gauges.items()):
        try:
            value = float(read())
        except Exception:  # a gauge that cannot be read now is left out of this scrape, and said so
            log.exception("metrics: gauge %s failed", name)
            continue
        family(name, GaugeMetricFamily).metric.add_metric(values, value)
    return [f.metric for f in out.values()]


class _Collector:
    def __init__(self, counters: dict[str, int], gauges: dict[str, Callable[[], float]], labels: dict[str, str]):
        self.counters, self.gauges, self.labels = counters, gauges, labels

    def collect(self) -> Iterable[Metric]:
        return families(dict(self.counters), dict(self.gauges), self.labels)


class MetricsServer:
    """/metrics on HOST:PORT in a daemon thread (prometheus_client's WSGI server)."""

    def __init__(self, listen: str, counters: dict[str, int], gauges: dict[str, Callable[[], float]],
                 labels: dict[str, str]) -> None:
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(counters, gauges, labels))  # type: ignore[arg-type]
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}; "
                          "choose another --metrics-listen") from None
        log.info("Prometheus metrics at http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
