"""Kernel network records to session.network audit events. Pure."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ringfence.contract.api import SessionInfo
from ringfence.contract.events import SessionNetwork

from .records import attribute, rfc3339, stable_uid


@dataclass(frozen=True)
class NetRecord:
    """A copy of struct net_event, detached from the ring buffer."""

    boot_ns: int
    wall_time: float
    cgroup_id: int
    pid: int
    family: int
    dst_port: int
    operation: int
    action: int
    src_addr: bytes
    dst_addr: bytes
    comm: str


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw[:16]))


def record_uid(rec: NetRecord) -> str:
    """The same record always gets the same uid: a record read again after the
    enforcer died mid-read is then dropped as a duplicate downstream."""
    return stable_uid(f"{rec.boot_ns}:{rec.pid}:{rec.cgroup_id}:{rec.family}:{rec.dst_addr.hex()}:{rec.dst_port}:"
                      f"{rec.operation}")


def to_event(rec: NetRecord, session: SessionInfo | None) -> SessionNetwork:
    ev = SessionNetwork(
        uid=record_uid(rec),
        time=rfc3339(rec.wall_time),
        pid=rec.pid,
        cgroup_id=rec.cgroup_id,
        program=rec.comm,
        src_addr=_addr(rec.family, rec.src_addr),
        dst_addr=_addr(rec.family, rec.dst_addr),
        dst_port=rec.dst_port,
        version=4 if rec.family == socket.AF_INET else 6,
        operation=rec.operation,
        action=rec.action,
    )
    return attribute(ev, session)
