"""Sockets passed over SCM_RIGHTS, to check they are judged by the process that uses them.

    fdpass.py serve PATH        (an unrestricted process) create a TCP and a UDP socket,
                                hand both to whoever connects to the unix socket PATH, once
    fdpass.py use PATH HOST PORT  receive them; connect() the TCP one and sendto() with the
                                UDP one to HOST:PORT; print {"tcp": result, "udp": result}

Results as netprobe.py: "allowed", "eperm" or the errno name.
"""

import array
import errno
import json
import os
import socket
import sys


def result(fn) -> str:
    try:
        fn()
        return "allowed"
    except ConnectionRefusedError:
        return "allowed"
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else errno.errorcode.get(exc.errno, str(exc))


def serve(path: str) -> None:
    tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [tcp.fileno(), udp.fileno()]))])
    conn.recv(1)  # until the user is done


def use(path: str, host: str, port: int) -> None:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    fds = array.array("i")
    _, ancdata, _, _ = conn.recvmsg(1, socket.CMSG_LEN(2 * fds.itemsize))
    fds.frombytes(ancdata[0][2][: 2 * fds.itemsize])
    tcp = socket.socket(fileno=fds[0])
    udp = socket.socket(fileno=fds[1])
    tcp.settimeout(1)
    print(json.dumps({"tcp": result(lambda: tcp.connect((host, port))),
                      "udp": result(lambda: udp.sendto(b"probe", (host, port)))}), flush=True)
    conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        use(sys.argv[2], sys.argv[3], int(sys.argv[4]))
