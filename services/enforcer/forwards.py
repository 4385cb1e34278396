"""How long ago an SSH connection last forwarded anything from its client.

`ssh -L`/`-D` forwards are TCP connections sshd makes from inside the
connection's cgroup: data it sends on them is what the client sent. The
kernel keeps, per socket, how long ago data was last sent (tcp_info
tcpi_last_data_sent) and the socket's cgroup (INET_DIAG_CGROUP_ID), so one
sock_diag dump answers for every connection at once. Output coming back from
the destination does not count: the idle timeout is about the person.
"""

from __future__ import annotations

import socket

from pyroute2 import DiagSocket

INET_DIAG_INFO = 1 << 1


def input_ages(cgroup_ids: set[int], exclude: set[str]) -> dict[int, float]:
    """cgroup id -> seconds since a TCP socket of that cgroup last sent data, for
    sockets that ever sent any; `exclude` names local "addr:port"s to skip (the
    SSH connection's own socket, should it be in the cgroup)."""
    ages: dict[int, float] = {}
    if not cgroup_ids:
        return ages
    with DiagSocket() as diag:
        diag.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in diag.get_sock_stats(family=family, extensions=INET_DIAG_INFO):
                cgroup = msg.get_attr("INET_DIAG_CGROUP_ID")
                if cgroup not in cgroup_ids:
                    continue
                local = f"{msg['idiag_src']}:{msg['idiag_sport']}"
                info = msg.get_attr("INET_DIAG_INFO")
                if local in exclude or not info or not info.get("tcpi_bytes_sent"):
                    continue
                age = info["tcpi_last_data_sent"] / 1000.0
                ages[cgroup] = min(age, ages.get(cgroup, age))
    return ages
