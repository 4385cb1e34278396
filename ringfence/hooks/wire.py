"""The enforcer socket protocol, for the standard-library-only hooks.

A client sends one JSON request line (ringfence/contract/api.py
OpenSessionRequest); a session that runs a program sends its stdin, stdout and
stderr with it as SCM_RIGHTS. Replies are JSON lines: OpenSessionReply, then,
for a program, `{"exit": N}` when it ends. The client talks only to a socket
whose peer is root (SO_PEERCRED), found from root-owned configuration.

Every SSH login starts this twice (PAM hook and wrapper), so it imports only
modules built into the interpreter: `socket`, `json`, `array` and `signal`
would pull in enum, re, selectors and collections, and cost more CPU than the
rest of a hook together (`python3 -I -S -X importtime`; bench/login.py).
"""

import _socket
import _struct
import os

try:  # CPython's JSON accelerator, which the json package wraps
    from _json import encode_basestring_ascii, make_scanner
except ImportError:  # other interpreters: the json package's own, slower to import
    from json.decoder import JSONDecoder
    from json.encoder import encode_basestring_ascii

    def make_scanner(context):
        return JSONDecoder(strict=context.strict, parse_constant=context.parse_constant).scan_once

DEFAULT_DATA_DIR = "/var/lib/ringfence"
SOCKET_NAME = "enforcer.sock"
MAX_LINE = 64 * 1024  # a request or reply line; the enforcer refuses longer ones


class HookError(Exception):
    """Shown to the user as it is."""


def dumps(value: object) -> str:
    """Compact JSON, as json.dumps(value, separators=(",", ":")) writes it, for the
    types a request holds (str, bool, int, None, list, dict with str keys)."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"a JSON object key must be a string, not {type(key).__name__} {key!r}")
        return "{" + ",".join(f"{encode_basestring_ascii(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot send {type(value).__name__} to the enforcer")


class _Decoding:
    """What the JSON scanner asks of its decoder: plain values, no NaN or Infinity."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON value")


_scan = make_scanner(_Decoding())


def loads(text: str) -> object:
    """One JSON value, alone on its line (surrounding whitespace aside); ValueError otherwise."""
    text = text.strip(" \t\r\n")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not a JSON value") from None
    if end != len(text):
        raise ValueError(f"extra data after the JSON value at {end}")
    return value


def socket_path(argv: list[str]) -> str:
    """The socket from `--socket PATH` or `--data-dir DIR` (both come from root-owned
    sshd and PAM configuration), else the default data dir."""
    for flag, make in (("--socket", lambda v: v), ("--data-dir", lambda v: os.path.join(v, SOCKET_NAME))):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 < len(argv):
                return make(argv[i + 1])
    return os.path.join(DEFAULT_DATA_DIR, SOCKET_NAME)


def peer_uid(sock: _socket.socket) -> int:
    _pid, uid, _gid = _struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))
    return uid


def connect(path: str, timeout: float | None) -> _socket.socket:
    """A connection to the enforcer at `path`, refusing any peer but root."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise HookError(f"no enforcer socket at {path}; is the Ringfence enforcer running on this host?") from None
    except OSError as exc:
        sock.close()
        raise HookError(f"cannot reach the Ringfence enforcer at {path}: {exc.strerror or exc}") from None
    uid = peer_uid(sock)
    if uid != 0:
        sock.close()
        raise HookError(f"{path} is served by uid {uid}, not root; refusing to use it")
    return sock


def send(sock: _socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = dumps(message).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise HookError(f"request of {len(data)} bytes is over the limit of {MAX_LINE}")
    if fds:
        rights = _struct.pack(f"{len(fds)}i", *fds)
        sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        data = data[sent:]
    if data:  # (sendall of nothing still sends: EPIPE once the peer has answered and closed)
        sock.sendall(data)


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors a recvmsg() received as SCM_RIGHTS (the receiver must close them)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            whole = len(data) - len(data) % 4
            fds += _struct.unpack(f"{whole // 4}i", data[:whole])
    return fds


class Lines:
    """JSON lines from a socket, each at most MAX_LINE bytes."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> dict | None:
        """The next message, or None when the peer closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except InterruptedError:
                continue
            if not chunk:
                return None
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise HookError("the enforcer sent an oversized reply")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            message = loads(line.decode())
        except ValueError:  # UnicodeDecodeError is one too
            raise HookError("the enforcer sent a reply that is not JSON") from None
        if not isinstance(message, dict):
            raise HookError("the enforcer sent a reply that is not a JSON object")
        return message


def open_session(path: str, request: dict, fds: list[int] | tuple[int, ...] = (),
                 timeout: float = 30.0) -> tuple[_socket.socket, Lines, dict]:
    """Ask for a session; returns the connection and the reply, or raises HookError
    with the enforcer's reason when refused."""
    sock = connect(path, timeout)
    try:
        send(sock, request, fds)
        lines = Lines(sock)
        reply = lines.next()
    except OSError as exc:
        sock.close()
        raise HookError(f"no reply from the Ringfence enforcer at {path}: {exc.strerror or exc}") from None
    except HookError:
        sock.close()
        raise
    if reply is None:
        sock.close()
        raise HookError(f"the Ringfence enforcer at {path} closed the connection without a reply")
    if not reply.get("ok"):
        sock.close()
        raise HookError(str(reply.get("error") or "refused by the Ringfence enforcer"))
    sock.settimeout(None)
    return sock, lines, reply


def wait_exit(lines: Lines) -> int:
    """The program's exit status, when the relay reports it; 255 if the connection ends first."""
    while True:
        try:
            message = lines.next()
        except (OSError, HookError):
            return 255
        if message is None:
            return 255
        if "exit" in message:
            code = message["exit"]
            return code if isinstance(code, int) and 0 <= code <= 255 else 255
