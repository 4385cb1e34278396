"""Kernel network records (struct net_event, bpf/ringfence.h) to session.network
audit events. Pure."""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from ringfence.contract.api import SessionInfo
from ringfence.contract.events import OPERATION_PACKET, REASON_OUTSIDE_SESSION, SessionNetwork

from .records import attribute, rfc3339, stable_uid, wall_time

# struct net_event
NET_EVENT = struct.Struct("<QQIIHHBBBB16s16s16s")
SUBJECT_SESSION = 1
SUBJECT_OUTSIDE = 2


class NetRecord(NamedTuple):
    """A copy of struct net_event, detached from the ring buffer (a tuple: cheap to make)."""

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
    uid: int = 0
    subject: int = SUBJECT_SESSION
    protocol: int = 0

    @property
    def outside(self) -> bool:
        """A process of a restricted login outside any session."""
        return self.subject == SUBJECT_OUTSIDE


def parse_net(raw: bytes, offset: float) -> NetRecord:
    """A NetRecord from one events_network record; `offset` from records.boot_offset()."""
    (boot_ns, cgroup_id, pid, uid, family, dst_port, operation, action, subject, protocol, src, dst,
     comm) = NET_EVENT.unpack_from(raw)
    return NetRecord(boot_ns=boot_ns, wall_time=wall_time(boot_ns, offset), cgroup_id=cgroup_id, pid=pid,
                     family=family, dst_port=dst_port, operation=operation, action=action, src_addr=src,
                     dst_addr=dst, comm=comm.split(b"\0", 1)[0].decode(errors="replace"), uid=uid,
                     subject=subject, protocol=protocol)


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def destination(rec: NetRecord) -> str:
    """"127.0.0.5:80", "[::1]:80"; an ICMP or raw packet has no port: the address alone."""
    addr = _addr(rec.family, rec.dst_addr)
    if rec.operation == OPERATION_PACKET:
        return addr
    return f"{addr}:{rec.dst_port}" if rec.family == socket.AF_INET else f"[{addr}]:{rec.dst_port}"


def record_uid(rec: NetRecord) -> str:
    """The same record always gets the same uid: a record read again after the
    enforcer died mid-read is then dropped as a duplicate downstream."""
    return stable_uid(f"{rec.boot_ns}:{rec.pid}:{rec.cgroup_id}:{rec.family}:{rec.dst_addr.hex()}:{rec.dst_port}:"
                      f"{rec.operation}")


def to_event(rec: NetRecord, session: SessionInfo | None, login: str = "") -> SessionNetwork:
    """The audit event; `session` attributes a session's record, `login` (the
    uid's name) one of a restricted login outside sessions."""
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
    if rec.outside:
        ev.login = login or str(rec.uid)
        ev.reason = REASON_OUTSIDE_SESSION
        return ev
    return attribute(ev, session)
