"""Running a channel's program under Ringfence: behind a pty (interactive,
recorded) or directly (commands, sftp), relaying the enforcer's notices.

Recording: output ("o") always; input ("i") only while the terminal echoes,
so passwords typed at a no-echo prompt (sudo, ssh) stay out of recordings.
Updates go to the enforcer every FLUSH_INTERVAL or FLUSH_BYTES.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time
import tty

from ..contract.api import SessionUpdate
from .enforcer_link import EnforcerLink

FLUSH_INTERVAL = 0.05
FLUSH_BYTES = 32 * 1024


def window_size(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return cols, rows
    except OSError:
        return 0, 0


def _set_window(fd: int, cols: int, rows: int) -> None:
    if cols and rows:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        data = data[n:]


class _Batch:
    """Recording events waiting to go to the enforcer."""

    def __init__(self, link: EnforcerLink | None, record: bool) -> None:
        self.link = link
        self.record = record
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str, str]] = []
        self.size = 0
        self.last_flush = self.t0
        self.decoders = {code: codecs.getincrementaldecoder("utf-8")(errors="replace") for code in "io"}

    def add(self, code: str, data: bytes | str) -> None:
        if not (self.link and self.record):
            return
        text = data if isinstance(data, str) else self.decoders[code].decode(data)
        if text:
            self.events.append((round(time.monotonic() - self.t0, 6), code, text))
            self.size += len(text)

    def activity(self) -> None:
        """Non-recorded channels still report that the user is active (idle limits)."""
        if self.link and not self.record:
            self.events.append((round(time.monotonic() - self.t0, 6), "i", ""))

    def flush(self, force: bool = False, end: bool = False) -> None:
        if not self.link:
            return
        due = self.size >= FLUSH_BYTES or time.monotonic() - self.last_flush >= FLUSH_INTERVAL
        if (self.events and (due or force)) or end:
            self.link.send(SessionUpdate(events=self.events, end=end))
            self.events, self.size, self.last_flush = [], 0, time.monotonic()


def _notify(link: EnforcerLink, out_fd: int, crlf: bool) -> bool:
    """Show the enforcer's notices to the user, then say so; True when the link closed."""
    notices, closed = link.notices()
    for n in notices:
        text = f"\r\n{n.message}\r\n" if crlf else f"{n.message}\n"
        _write_all(out_fd, text.encode())
    if notices and not closed:
        link.send(SessionUpdate(noticed=True))
    return closed


def run_with_pty(path: str, argv: list[str], link: EnforcerLink | None, record: bool) -> int:
    """Run `argv` (exec'd from `path`) on a new pty, proxying our terminal to it."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execv(path, argv)
        except OSError as exc:
            sys.stderr.write(f"ringfence: cannot run {path}: {exc.strerror}\n")
        os._exit(127)

    cols, rows = window_size(0)
    _set_window(master, cols, rows)
    batch = _Batch(link, record)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGWINCH, lambda *_: os.write(wake_w, b"w"))
    saved = None
    with contextlib.suppress(termios.error):
        saved = termios.tcgetattr(0)
        tty.setraw(0, termios.TCSANOW)  # TCSAFLUSH would drop what the user typed ahead
    stdin_open = True
    try:
        while True:
            watch = [master, wake_r] + ([0] if stdin_open else []) + ([link] if link else [])
            readable, _, _ = select.select(watch, [], [], FLUSH_INTERVAL)
            if wake_r in readable:
                os.read(wake_r, 64)
                cols, rows = window_size(0)
                _set_window(master, cols, rows)
                batch.add("r", f"{cols}x{rows}")
            if 0 in readable:
                data = os.read(0, 65536)
                if not data:
                    stdin_open = False
                else:
                    _write_all(master, data)
                    echoing = bool(termios.tcgetattr(master)[3] & termios.ECHO)
                    if echoing:
                        batch.add("i", data)
                    else:
                        batch.activity()
            if master in readable:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the pty is gone
                    data = b""
                if not data:
                    break
                _write_all(1, data)
                batch.add("o", data)
            if link and link in readable and _notify(link, 1, crlf=True):
                link = batch.link = None  # enforcer gone: keep the session going, unrecorded
            batch.flush()
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, saved)
    _, status = os.waitpid(pid, 0)
    batch.flush(force=True, end=True)
    return os.waitstatus_to_exitcode(status)


def run_plain(path: str, argv: list[str], link: EnforcerLink | None) -> int:
    """Run `argv` with our stdio (commands, sftp); relay notices to stderr meanwhile."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(path, argv)
        except OSError as exc:
            sys.stderr.write(f"ringfence: cannot run {path}: {exc.strerror}\n")
        os._exit(127)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if link:
            readable, _, _ = select.select([link], [], [], 0.2)
            if readable and _notify(link, 2, crlf=False):
                link = None
        else:
            time.sleep(0.2)
    if link:
        link.send(SessionUpdate(end=True))
    return os.waitstatus_to_exitcode(status)
