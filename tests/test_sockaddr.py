"""The addresses session.start gives an SSH connection, from the sshd process's socket
(services/enforcer/sockaddr.py): asked of the socket itself, or read from /proc."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from services.enforcer import sockaddr

# Holds, in this order: a listening socket, a Unix socket pair, and one connection to argv[1]:argv[2].
HOLDER = """if True:
    import socket, sys
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    listener = socket.socket(family)
    listener.bind((sys.argv[1], 0))
    listener.listen()
    pair = socket.socketpair()
    conn = socket.socket(family)
    conn.connect((sys.argv[1], int(sys.argv[2])))
    print(conn.getsockname()[1], flush=True)
    sys.stdin.read()
"""


@pytest.fixture(params=[("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("::ffff:127.0.0.1", "127.0.0.1")],
                ids=["ipv4", "ipv6", "ipv4-mapped"])
def held(request):
    """A process holding one established TCP connection: (pid, remote, local) as it should read."""
    host, shown = request.param
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    if ":" in host:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::", 0))
    else:
        server.bind((host, 0))
    server.listen()
    port = server.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, host, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        local_port = int(proc.stdout.readline())
        accepted, _ = server.accept()
        yield proc.pid, f"{shown}:{port}", f"{shown}:{local_port}"
        accepted.close()
    finally:
        proc.kill()
        proc.wait()
        server.close()


def test_the_established_connection_is_found_and_both_ends_named(held):
    pid, remote, local = held
    assert sockaddr.connection_addresses(pid) == (remote, local)


def test_proc_net_tcp_names_the_same_ends(held):
    """The fallback where the kernel gives no copy of the socket (before 5.6, Yama ptrace_scope 3)."""
    pid, remote, local = held
    inodes = [inode for _fd, inode in sockaddr._sockets(pid)]
    assert sockaddr._from_proc_net(pid, inodes) == (remote, local)


def test_a_refused_copy_falls_back_to_proc(held, monkeypatch):
    pid, remote, local = held

    def refused(pid, fds):
        raise PermissionError(1, "pidfd_getfd: Operation not permitted")

    monkeypatch.setattr(sockaddr, "_from_sockets", refused)
    assert sockaddr.connection_addresses(pid) == (remote, local)


def test_a_process_without_a_connection_or_gone_has_no_addresses():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert sockaddr.connection_addresses(proc.pid) == ("", "")
    finally:
        proc.kill()
        proc.wait()
    assert sockaddr.connection_addresses(proc.pid) == ("", "")
