"""relayd: the enforcer's root helper that forks one relay per session.

Started by the enforcer (`<python3> -I -S relayd.py --fd N --cgroup DIR`) with
one end of a socket pair as fd N. It moves itself into DIR (a cgroup outside
every session, so killing a session never kills its relay, and stopping the
enforcer's service does not either), then serves spawn requests: a JSON line
(ringfence/contract/relay.py RelaySpec) with the session's fds as SCM_RIGHTS
(wrapper socket, stdin, stdout, stderr). It forks; the child runs the relay
(ringfence/hooks/relay.py), the parent replies `{"pid": N}`.

Forking this small single-threaded process is a few milliseconds, where
starting a fresh interpreter per session would be tens. relayd exits when the
enforcer's end closes; the relays it started carry on with their sessions.
"""

import array
import json
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ringfence.hooks import relay  # after the path is set

MAX_REQUEST = 4 * 1024 * 1024
MAX_FDS = 4


def _reap(*_) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return


def _receive(sock: socket.socket, buf: bytearray) -> tuple[bytes | None, list[int]]:
    """One request line and the fds that came with it; None at the end."""
    fds: list[int] = []
    while b"\n" not in buf:
        try:
            data, ancdata, _flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except InterruptedError:
            continue
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds += list(arr)
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        buf += data
        if len(buf) > MAX_REQUEST:
            raise ValueError("spawn request too large")
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line, fds


def _spawn(spec: dict, fds: list[int], control: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = relay.main(spec, fds)
        except BaseException:  # a relay must never fall back into relayd's loop
            code = 255
        os._exit(code)
    for fd in fds:
        os.close(fd)
    return pid


def main(argv: list[str]) -> int:
    fd = int(argv[argv.index("--fd") + 1])
    cgroup = argv[argv.index("--cgroup") + 1] if "--cgroup" in argv else ""
    if cgroup:
        os.makedirs(cgroup, mode=0o755, exist_ok=True)
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    os.setsid()  # not in the enforcer's session or process group: its signals are not ours
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _reap)
    control = socket.socket(fileno=fd)
    control.sendall(b'{"ready":true}\n')
    buf = bytearray()
    while True:
        line, fds = _receive(control, buf)
        if line is None:
            return 0
        try:
            spec = json.loads(line)
            if len(fds) != 4:
                raise ValueError(f"expected 4 fds (wrapper, stdin, stdout, stderr), got {len(fds)}")
            reply = {"pid": _spawn(spec, fds, control)}
        except (ValueError, OSError) as exc:
            for extra in fds:
                try:
                    os.close(extra)
                except OSError:
                    pass
            reply = {"error": str(exc)}
        control.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
