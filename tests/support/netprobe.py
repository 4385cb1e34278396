"""Runs inside a session: tries connections and reports what the kernel said.

    netprobe.py tcp:127.0.0.5:9 udp:[::1]:9 ...        one JSON object {target: result}
    netprobe.py --loop SECONDS --interval S tcp:...     one JSON line per attempt
    netprobe.py ping:127.0.0.5 raw:127.0.0.5            an ICMP echo request from a ping socket
                                                        (needs net.ipv4.ping_group_range) or a raw one

Results: "allowed" (connected, or refused by the peer: the packet left),
"eperm" (blocked by Ringfence), or the errno name.
"""

import errno
import json
import os
import socket
import sys
import time

ECHO_REQUEST = bytes([8, 0, 0, 0, 0, 1, 0, 1]) + b"ringfence"


def icmp(proto: str, host: str) -> str:
    kind = socket.SOCK_DGRAM if proto == "ping" else socket.SOCK_RAW
    try:
        s = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else errno.errorcode.get(exc.errno, str(exc))
    try:
        s.sendto(ECHO_REQUEST, (host, 0))
        return "allowed"
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else errno.errorcode.get(exc.errno, str(exc))
    finally:
        s.close()


def attempt(target: str) -> str:
    proto, rest = target.split(":", 1)
    if proto in ("ping", "raw"):
        return icmp(proto, rest)
    host, port = rest.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    s.settimeout(1)
    try:
        if proto == "tcp" or proto == "udpconnect":
            s.connect((host, int(port)))
        else:
            s.sendto(b"probe", (host, int(port)))
        return "allowed"
    except ConnectionRefusedError:
        return "allowed"
    except OSError as exc:
        return "eperm" if exc.errno == errno.EPERM else errno.errorcode.get(exc.errno, str(exc))
    finally:
        s.close()


def main(argv: list[str]) -> None:
    if argv[:1] == ["--loop"]:
        seconds, interval, targets = float(argv[1]), float(argv[3]), argv[4:]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            print(json.dumps({"t": time.time(), **{t: attempt(t) for t in targets}}), flush=True)
            time.sleep(interval)
        return
    results = {t: attempt(t) for t in argv}
    # Who made the calls, for checking audit events against: pid and kernel comm.
    results["_pid"] = os.getpid()
    with open("/proc/self/comm") as comm:
        results["_comm"] = comm.read().strip()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
