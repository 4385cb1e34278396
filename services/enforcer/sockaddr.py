"""The client and server address of an SSH connection, from the sshd process's socket.

PAM tells the hook only the client host (PAM_RHOST); the connection's socket
in /proc gives both ends with ports, as session.start wants them.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

ESTABLISHED = "01"


def _decode(hex_addr: str) -> str:
    """/proc/net/tcp{,6} address "0100007F:0016" -> "127.0.0.1:22"."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    port_n = int(port, 16)
    return f"[{addr}]:{port_n}" if addr.version == 6 else f"{addr}:{port_n}"


def parse_proc_net_tcp(text: str) -> dict[int, tuple[str, str, str]]:
    """inode -> (local, remote, state) for every socket in a /proc/net/tcp{,6} table."""
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 10:
            out[int(parts[9])] = (_decode(parts[1]), _decode(parts[2]), parts[3])
    return out


def connection_addresses(pid: int) -> tuple[str, str]:
    """(remote, local) of the first established TCP socket `pid` holds, or ("", "")."""
    inodes = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
    except OSError:
        return "", ""
    table: dict[int, tuple[str, str, str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            table.update(parse_proc_net_tcp(Path(f"/proc/{pid}/net/{name}").read_text()))
        except OSError:
            continue
    for inode in inodes:
        entry = table.get(inode)
        if entry and entry[2] == ESTABLISHED:
            return entry[1], entry[0]
    return "", ""
