"""One session's relay: root, forked by relayd for each session that runs a program.

It owns the session's I/O, so nothing the user runs can switch it off:
- interactive: it takes the client's terminal (sshd's pty, or `ringfence run`'s)
  over: the device becomes root's, every other holder is hung up
  (TIOCVHANGUP) and the relay reopens it as its own controlling terminal, so
  resizes and hang-ups come to it. The program runs on a new pty the relay
  holds the master of.
- otherwise: the program gets pipes; the relay copies the client's stdin to
  it and its stdout and stderr back.
The program runs as the login, in the session's cgroup (it moves itself
there before dropping root). The user's processes cannot signal, trace or
feed the relay: it is root and outside the session.

What the relay sees goes to an append-only file (spec.out), one JSON object
per line (ringfence/contract/relay.py: started, rec, active, idle, sftp, exit,
failed, closed), which the enforcer follows; it survives the enforcer being
down or restarting. The enforcer talks back on spec.control (a Unix socket
the relay listens on): notices, the idle timeout, a peer's keystrokes.

Recording: output always; input while the terminal echoes (so passwords
typed at no-echo prompts stay out) and, for commands, stdin up to
spec.stdin_limit bytes. Idle: only input from the client counts; after
spec.idle_timeout without any, the relay shows spec.idle_message, reports it
and ends this session only.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import pty
import resource
import select
import signal
import socket
import struct
import sys
import termios
import time
import tty

FLUSH_INTERVAL = 0.05
FLUSH_TEXT = 16 * 1024  # recorded characters per rec line (JSON escaping stays under the chunk limit)
ACTIVE_REPORT = 1.0  # at most one `active` line a second, and only after input
FSYNC_INTERVAL = 1.0
MAX_BUFFER = 256 * 1024  # bytes waiting for a slow reader before the other side is paused
DRAIN_AFTER_EXIT = 0.3  # output still arriving after the program exited
READ = 65536
TIOCVHANGUP = 0x5437


def _nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _write_some(fd: int, buf: bytearray) -> bool:
    """Write what the fd takes now; False when it is gone."""
    try:
        n = os.write(fd, buf)
    except BlockingIOError:
        return True
    except OSError:
        return False
    del buf[:n]
    return True


def window_size(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return cols, rows
    except OSError:
        return 0, 0


def set_window(fd: int, cols: int, rows: int) -> None:
    if cols and rows:
        try:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass


class Journal:
    """The append-only line file the enforcer follows."""

    def __init__(self, path: str, listeners: list[socket.socket]) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.n = 0
        self.listeners = listeners
        self.last_sync = time.monotonic()
        self.failed = ""

    def write(self, kind: str, **fields) -> None:
        self.n += 1
        line = json.dumps({"t": kind, "n": self.n, **fields}, separators=(",", ":"))
        try:
            os.write(self.fd, line.encode() + b"\n")
        except OSError as exc:
            self.failed = self.failed or f"cannot write the session journal: {exc.strerror}"
            return
        for conn in list(self.listeners):
            try:
                conn.send(b"w")  # the enforcer reads the new line now rather than at its next poll
            except BlockingIOError:
                pass
            except OSError:
                self.listeners.remove(conn)

    def sync(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_sync >= FSYNC_INTERVAL:
            self.last_sync = now
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.failed = self.failed or f"cannot write the session journal: {exc.strerror}"

    def close(self) -> None:
        self.sync(force=True)
        os.close(self.fd)


class Recording:
    """Terminal events waiting to be written as `rec` lines."""

    def __init__(self, journal: Journal, enabled: bool) -> None:
        self.journal = journal
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.events: list[list] = []
        self.size = 0
        self.seq = 0
        self.last_flush = self.t0
        self.decoders: dict[str, codecs.IncrementalDecoder] = {}

    def add(self, code: str, data: bytes | str, stream: str = "") -> None:
        if not self.enabled:
            return
        if isinstance(data, bytes):
            decoder = self.decoders.setdefault(stream or code, codecs.getincrementaldecoder("utf-8")("replace"))
            data = decoder.decode(data)
        if data:
            self.events.append([round(time.monotonic() - self.t0, 6), code, data])
            self.size += len(data)
            if self.size >= FLUSH_TEXT:
                self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.events and (force or now - self.last_flush >= FLUSH_INTERVAL):
            self.journal.write("rec", seq=self.seq, ev=self.events)
            self.seq += 1
            self.events, self.size = [], 0
        self.last_flush = now


class Relay:
    def __init__(self, spec: dict, wrapper: socket.socket, cin: int, cout: int, cerr: int) -> None:
        self.spec = spec
        self.wrapper = wrapper
        self.cin, self.cout, self.cerr = cin, cout, cerr
        self.control_conns: list[socket.socket] = []
        self.control_buffers: dict[socket.socket, bytes] = {}
        self.journal = Journal(spec["out"], self.control_conns)
        self.rec = Recording(self.journal, spec.get("record", "node") != "off")
        self.interactive = bool(spec.get("interactive"))
        self.idle_timeout = float(spec.get("idle_timeout") or 0)
        self.idle_message = spec.get("idle_message") or ""
        self.stdin_left = int(spec.get("stdin_limit") or 0)
        self.stdin_truncated = False
        self.client_open = True  # until the client's stdin ends
        self.last_input = time.monotonic()
        self.input_since_report = False
        self.last_report = 0.0
        self.child = 0
        self.status: int | None = None
        self.ending = ""  # why the relay is ending the session early
        self.saved_termios = None
        self.to_client: dict[int, bytearray] = {}
        self.to_child = bytearray()
        self.child_in = -1
        self.outputs: dict[int, int] = {}  # child-side fd -> client fd
        self.master = -1
        self.auditor = None
        self.listener: socket.socket | None = None

    # --- the client's side ---------------------------------------------------------------------
    def _take_terminal(self) -> None:
        """Make the client's terminal ours alone (see the module docstring)."""
        name = os.ttyname(self.cin)
        try:
            os.chown(name, 0, 0)
            os.chmod(name, 0o600)
            fcntl.ioctl(self.cin, TIOCVHANGUP)
            fd = os.open(name, os.O_RDWR)  # as the session leader with no terminal: it becomes ours
        except OSError:
            return  # not ours to take (e.g. a terminal that is not a pty): keep using the fds as given
        for old in {self.cin, self.cout, self.cerr}:
            os.close(old)
        self.cin = self.cout = self.cerr = fd

    # --- starting the program ------------------------------------------------------------------
    def _exec_child(self, stdin: int, stdout: int, stderr: int, ctty: int) -> None:
        """In the forked child: become the login in the session's cgroup and exec. Never returns."""
        spec = self.spec
        try:
            os.setsid()
            if ctty >= 0:
                fcntl.ioctl(ctty, termios.TIOCSCTTY, 0)
            for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
                os.dup2(fd, target)
            with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            if spec.get("loginuid") is not None:
                try:
                    with open("/proc/self/loginuid", "w") as f:
                        f.write(str(spec["loginuid"]))
                except OSError:
                    pass
            for res, soft, hard in spec.get("rlimits", []):
                try:
                    resource.setrlimit(res, (soft, hard))
                except (OSError, ValueError):
                    pass
            os.umask(spec.get("umask", 0o022))
            os.setgroups(spec.get("groups", []))
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
            try:
                os.chdir(spec.get("home") or "/")
            except OSError:
                os.chdir("/")
            for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                        signal.SIGPIPE, signal.SIGWINCH, signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.closerange(3, 65536)
            argv = spec["argv"]
            os.execvpe(spec.get("path") or argv[0], argv, spec.get("env", {}))
        except OSError as exc:
            what = spec["argv"][0] if spec.get("argv") else "the program"
            os.write(2, f"ringfence: cannot run {what}: {exc.strerror}\r\n".encode())
        os._exit(127)

    def _start_child(self) -> None:
        if self.interactive:
            self.master, slave = pty.openpty()
            cols, rows = window_size(self.cin)
            set_window(self.master, cols or 80, rows or 24)
            pid = os.fork()
            if pid == 0:
                os.close(self.master)
                self._exec_child(slave, slave, slave, slave)
            os.close(slave)
            _nonblocking(self.master)
            self.child_in = self.master
            self.outputs = {self.master: self.cout}
            self.journal.write("started", pid=pid, width=cols or 80, height=rows or 24, time=int(time.time()))
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                for fd in (in_w, out_r, err_r):
                    os.close(fd)
                self._exec_child(in_r, out_w, err_w, -1)
            for fd in (in_r, out_w, err_w):
                os.close(fd)
            for fd in (in_w, out_r, err_r):
                _nonblocking(fd)
            self.child_in = in_w
            self.outputs = {out_r: self.cout, err_r: self.cerr}
            self.journal.write("started", pid=pid, width=0, height=0, time=int(time.time()))
        self.child = pid

    # --- the loop ------------------------------------------------------------------------------
    def _listen_control(self) -> None:
        # An abstract socket ("@name": no path-length limit, gone with the relay). Anyone may
        # connect; only root is listened to (SO_PEERCRED in _on_accept).
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.spec["control"].removeprefix("@"))
        self.listener.listen(4)
        self.listener.setblocking(False)

    def run(self) -> int:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.wake_r, wake_w = os.pipe()
        _nonblocking(self.wake_r)
        _nonblocking(wake_w)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGWINCH, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)  # handled in the loop, woken through wake_r
        self._listen_control()
        if self.interactive:
            if self.spec.get("take_terminal"):
                self._take_terminal()
            try:
                self.saved_termios = termios.tcgetattr(self.cin)
                tty.setraw(self.cin, termios.TCSANOW)
            except termios.error:
                pass
        banner = self.spec.get("banner") or ""
        if banner:
            self._tell_raw(banner)
        if self.spec.get("sftp"):
            self.auditor = _sftp_auditor()
        try:
            self._start_child()
        except OSError as exc:
            self.journal.write("failed", message=f"cannot start the session's program: {exc.strerror}")
            return self._finish(255)
        for fd in {self.cin, self.cout, self.cerr, *self.outputs}:
            _nonblocking(fd)
        self.wrapper.setblocking(False)
        exited_at = 0.0
        while True:
            if self.status is None:
                timeout = FLUSH_INTERVAL
            else:
                exited_at = exited_at or time.monotonic()
                timeout = exited_at + DRAIN_AFTER_EXIT - time.monotonic()
                if timeout <= 0 or not self.outputs:
                    break
            self._poll_once(timeout)
            self._reap()
            self._timers()
        return self._finish(self._exit_code())

    def _poll_once(self, timeout: float) -> None:
        """One round: wait for what can move now, move it. A side whose reader is slow
        is not read meanwhile, so nothing buffers without bound."""
        readers: dict[int, object] = {self.wake_r: self._on_signal, self.listener.fileno(): self._on_accept}
        writers: dict[int, object] = {}
        if self.wrapper is not None:
            readers[self.wrapper.fileno()] = self._on_wrapper
        for conn in self.control_conns:
            readers[conn.fileno()] = lambda fd, conn=conn: self._on_control(conn)
        if self.client_open and self.child_in >= 0 and len(self.to_child) < MAX_BUFFER:
            readers[self.cin] = self._on_client
        if sum(len(b) for b in self.to_client.values()) < MAX_BUFFER:
            for fd in self.outputs:
                readers[fd] = self._on_output
        for fd, buf in self.to_client.items():
            if buf:
                writers[fd] = self._on_to_client
        if self.to_child and self.child_in >= 0:
            writers[self.child_in] = self._on_to_child
        poller = select.poll()
        for fd in readers.keys() | writers.keys():
            poller.register(fd, (select.POLLIN if fd in readers else 0) | (select.POLLOUT if fd in writers else 0))
        try:
            ready = poller.poll(max(0, int(timeout * 1000)))
        except InterruptedError:
            return
        for fd, events in ready:
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and fd in readers:
                readers[fd](fd)
            if events & (select.POLLOUT | select.POLLERR) and fd in writers:
                writers[fd](fd)

    def _on_signal(self, fd: int) -> None:
        try:
            sigs = os.read(fd, 64)
        except BlockingIOError:
            return
        for sig in sigs:
            if sig == signal.SIGWINCH and self.master >= 0:
                cols, rows = window_size(self.cin)
                set_window(self.master, cols, rows)
                self.rec.add("r", f"{cols}x{rows}")
            elif sig in (signal.SIGHUP, signal.SIGTERM):
                self._end_session("")  # the client hung up (or root asked): end the program

    def _on_client(self, fd: int) -> None:
        try:
            data = os.read(fd, READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.client_open = False
            if self.interactive:
                self._end_session("")  # the client's terminal is gone
            elif not self.to_child:
                self._close_child_in()
            return
        self.last_input = time.monotonic()
        self.input_since_report = True
        if self.interactive:
            try:
                echoing = bool(termios.tcgetattr(self.master)[3] & termios.ECHO)
            except termios.error:
                echoing = False
            if echoing:
                self.rec.add("i", data)
        elif self.auditor is not None:
            self._audit(self.auditor.feed_request, data)  # before sftp-server sees it (see sftp_audit.py)
            if "client" in self.auditor.stopped:
                self._end_session("ringfence: the sftp session sent a request that cannot be audited; it ends")
                return
        else:
            part = data[: self.stdin_left]
            self.stdin_left -= len(part)
            self.stdin_truncated = self.stdin_truncated or len(part) < len(data)
            if part:
                self.rec.add("i", part)
        self.to_child += data
        self._on_to_child(self.child_in)

    def _close_child_in(self) -> None:
        if self.child_in >= 0 and self.child_in != self.master:
            os.close(self.child_in)
            self.child_in = -1

    def _on_to_child(self, fd: int) -> None:
        if not _write_some(fd, self.to_child):
            self.to_child.clear()
            self._close_child_in()
        elif not self.to_child and not self.client_open:
            self._close_child_in()

    def _on_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ)
        except BlockingIOError:
            return
        except OSError:  # EIO: every holder of the pty's other end is gone
            data = b""
        if not data:
            del self.outputs[fd]
            if fd != self.master:
                os.close(fd)
            return
        target = self.outputs[fd]
        self.to_client.setdefault(target, bytearray()).extend(data)
        _write_some(target, self.to_client[target])
        if self.auditor is not None:
            if target == self.cout:
                self._audit(self.auditor.feed_response, data)
        else:
            self.rec.add("o", data, stream=str(fd))

    def _on_to_client(self, fd: int) -> None:
        if not _write_some(fd, self.to_client[fd]):
            self.to_client[fd].clear()

    def _on_wrapper(self, fd: int) -> None:
        try:
            data = self.wrapper.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.wrapper.close()
            self.wrapper = None
            self._end_session("")  # the channel is over for sshd: nobody waits for this program
        elif b"winch" in data and self.master >= 0:  # `ringfence run`'s terminal was resized
            cols, rows = window_size(self.cin)
            set_window(self.master, cols, rows)
            self.rec.add("r", f"{cols}x{rows}")
        # The size is read from the terminal itself: nothing the wrapper says is taken as fact.

    def _on_accept(self, fd: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != 0:
            conn.close()
            return
        conn.setblocking(False)
        self.control_conns.append(conn)
        self.control_buffers[conn] = b""

    def _on_control(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if conn in self.control_conns:
                self.control_conns.remove(conn)
            self.control_buffers.pop(conn, None)
            conn.close()
            return
        buf = self.control_buffers.get(conn, b"") + data
        *lines, buf = buf.split(b"\n")
        self.control_buffers[conn] = buf if len(buf) <= 4 * 1024 * 1024 else b""
        for line in lines:
            try:
                self._control(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue

    def _control(self, msg: dict) -> None:
        kind = msg.get("t")
        if kind == "notice":
            self._tell(str(msg.get("message", "")))
            if msg.get("end"):
                self._end_session("")
        elif kind == "idle_timeout":
            self.idle_timeout = float(msg.get("timeout") or 0)
            self.idle_message = str(msg.get("message") or self.idle_message)
        elif kind == "input" and self.child_in >= 0:
            data = str(msg.get("data", "")).encode()
            self.to_child += data
            self.rec.add("i", data, stream="peer")
            self._on_to_child(self.child_in)

    # --- ending --------------------------------------------------------------------------------
    def _tell(self, message: str) -> None:
        """A line for the user: on the terminal, or on stderr for commands."""
        if message:
            self._tell_raw(f"\n{message}\n" if self.interactive else f"{message}\n")

    def _tell_raw(self, text: str) -> None:
        data = text.encode()
        if self.interactive:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        fd = self.cout if self.interactive else self.cerr
        blocking = os.get_blocking(fd)
        try:
            os.set_blocking(fd, True)
            os.write(fd, data)
        except OSError:
            pass
        finally:
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass

    def _end_session(self, message: str) -> None:
        """End the program and everything it started: the whole session cgroup."""
        if self.ending:
            return
        self.ending = message or "ended"
        self._tell(message)
        try:
            with open(os.path.join(self.spec["cgroup"], "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            if self.child:
                try:
                    os.killpg(self.child, signal.SIGKILL)
                except OSError:
                    pass

    def _timers(self) -> None:
        now = time.monotonic()
        self.rec.flush()
        if self.input_since_report and now - self.last_report >= ACTIVE_REPORT:
            self.input_since_report = False
            self.last_report = now
            self.journal.write("active")
        if self.idle_timeout and now - self.last_input > self.idle_timeout and not self.ending:
            self.journal.write("idle", message=self.idle_message)
            self._end_session(self.idle_message)
        if self.journal.failed and self.spec.get("record") == "node-sync" and not self.ending:
            self._end_session(f"{self.journal.failed}; the session ends (session_recording mode node-sync)")
        self.journal.sync()

    def _reap(self) -> None:
        if self.status is not None or not self.child:
            return
        try:
            pid, status = os.waitpid(self.child, os.WNOHANG)
        except ChildProcessError:
            self.status = 255 << 8
            return
        if pid:
            self.status = status

    def _exit_code(self) -> int:
        status = self.status or 0
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.waitstatus_to_exitcode(status) & 0xFF

    def _audit(self, feed, data: bytes) -> None:
        try:
            ops = feed(data)
        except Exception:  # never let auditing stop the bytes
            self.auditor = None
            return
        if ops:
            self.journal.write("sftp", ops=ops)

    def _finish(self, code: int) -> int:
        # What is still buffered for the client goes out before it hears the exit status.
        deadline = time.monotonic() + 1.0
        for fd, buf in self.to_client.items():
            while buf and time.monotonic() < deadline:
                if not _write_some(fd, buf):
                    break
                if buf:
                    time.sleep(0.01)
        if self.saved_termios is not None:
            try:
                termios.tcsetattr(self.cin, termios.TCSAFLUSH, self.saved_termios)
            except termios.error:
                pass
        self.rec.flush(force=True)
        if self.auditor is not None:
            self._audit(lambda _: self.auditor.finish(), b"")
        signal_no = os.WTERMSIG(self.status) if self.status is not None and os.WIFSIGNALED(self.status) else 0
        self.journal.write("exit", code=code, signal=signal_no, stdin_truncated=self.stdin_truncated, recs=self.rec.seq)
        self.journal.write("closed")
        if self.wrapper is not None:  # the lines are written; the fsync below need not delay the user
            try:
                self.wrapper.setblocking(True)
                self.wrapper.sendall(json.dumps({"exit": code}).encode() + b"\n")
            except OSError:
                pass
        self.journal.close()
        return code


def _sftp_auditor():
    try:
        from ringfence.hooks.sftp_audit import SftpAuditor
    except ImportError:
        return None
    return SftpAuditor()


def main(spec: dict, fds: list[int]) -> int:
    """Run one session (called in relayd's forked child). fds: wrapper socket, stdin, stdout, stderr."""
    os.setsid()  # our own session: the client's terminal can become ours
    wrapper = socket.socket(fileno=fds[0])
    relay = Relay(spec, wrapper, fds[1], fds[2], fds[3])
    try:
        return relay.run()
    except Exception as exc:  # report it where the enforcer reads, then fail the session
        try:
            relay.journal.write("failed", message=f"relay error: {exc!r}")
            relay.journal.write("closed")
            relay._end_session("")
        except Exception:
            pass
        sys.stderr.write(f"ringfence relay {spec.get('sid')}: {exc!r}\n")
        return 255


if __name__ == "__main__":  # pragma: no cover - started through relayd
    sys.exit("relay.py runs inside relayd")
