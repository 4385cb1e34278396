"""The enforcer's side of session relays (ringfence/hooks/relay.py, relayd.py).

RelayLauncher keeps one relayd running and asks it to fork a relay per session.
RelayJournal follows one relay's journal file from a persisted cursor, so what a
relay wrote while the enforcer was down or restarting is read afterwards, once.
RelayControl sends a relay notices, idle timeouts and a peer's keystrokes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import msgspec

from ringfence.contract.relay import JournalLine, RelaySpec, journal_decoder

log = logging.getLogger(__name__)

HOOKS = Path(__file__).resolve().parents[2] / "ringfence" / "hooks"
RELAYD = HOOKS / "relayd.py"
MAX_JOURNAL_LINE = 1024 * 1024
READ_BATCH = 1024 * 1024  # journal bytes read per round


class RelayError(RuntimeError):
    pass


class RelayLauncher:
    """One relayd for this enforcer: started at start-up, asked to fork a relay per session."""

    def __init__(self, cgroup: Path, log_path: Path) -> None:
        self.cgroup = cgroup
        self.log_path = log_path  # relays outlive the enforcer: they must not hold its output pipes
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._buf = b""

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(RELAYD), "--fd", str(theirs.fileno()), "--cgroup", str(self.cgroup)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        theirs.close()
        ours.settimeout(10)
        self.sock, self._buf = ours, b""
        ready = self._line()
        if ready != b'{"ready":true}':
            raise RelayError(f"relayd did not start: {ready!r}")
        ours.settimeout(None)

    def _line(self) -> bytes:
        assert self.sock is not None
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise RelayError("relayd closed its socket")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _spawn(self, spec: RelaySpec, fds: list[int]) -> int:
        if self.sock is None or (self.proc and self.proc.poll() is not None):
            log.warning("relayd is gone (exit %s); starting a new one", self.proc.returncode if self.proc else None)
            self._start()
        assert self.sock is not None
        data = msgspec.json.encode(spec) + b"\n"
        sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            self.sock.sendall(data[sent:])
        reply = msgspec.json.decode(self._line(), type=dict)
        if "pid" not in reply:
            raise RelayError(f"relayd could not start the relay: {reply.get('error')}")
        return int(reply["pid"])

    async def spawn(self, spec: RelaySpec, fds: list[int]) -> int:
        """Start the session's relay; returns its pid."""
        async with self._lock:
            try:
                return await asyncio.to_thread(self._spawn, spec, fds)
            except OSError as exc:
                self.sock = None  # start a fresh relayd next time
                raise RelayError(f"cannot reach relayd: {exc}") from exc

    def close(self) -> None:
        if self.sock:
            self.sock.close()  # relayd exits; the relays it started carry on
            self.sock = None
        if self.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)


class RelayJournal:
    """One relay's journal: `<dir>/<sid>.jsonl`, read from `<dir>/<sid>.cursor`."""

    def __init__(self, directory: Path, sid: str) -> None:
        self.path = directory / f"{sid}.jsonl"
        self.cursor_path = directory / f"{sid}.cursor"
        self.control_name = control_name(sid)
        try:
            self.offset = int(self.cursor_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            self.offset = 0
        self.bad_lines = 0

    def read(self) -> tuple[list[JournalLine], int]:
        """The complete lines after the cursor, and the offset after them."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(READ_BATCH)
        except FileNotFoundError:
            return [], self.offset
        end = data.rfind(b"\n") + 1
        lines: list[JournalLine] = []
        for raw in data[:end].splitlines():
            try:
                lines.append(journal_decoder.decode(raw))
            except msgspec.DecodeError as exc:
                self.bad_lines += 1
                log.error("bad line in relay journal %s: %s", self.path, exc)
        return lines, self.offset + end

    def commit(self, offset: int) -> None:
        if offset != self.offset:
            self.offset = offset
            tmp = self.cursor_path.with_suffix(".tmp")
            tmp.write_text(str(offset))
            os.replace(tmp, self.cursor_path)

    def remove(self) -> None:
        for p in (self.path, self.cursor_path):
            p.unlink(missing_ok=True)


def control_name(sid: str) -> str:
    """The relay's control socket: abstract ("@" for the leading NUL), so a long data dir is no problem."""
    return f"@ringfence-relay-{sid}"


class RelayControl:
    """The enforcer's connection to one relay's control socket; `wake` is set
    whenever the relay says it wrote to its journal."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wake = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting = asyncio.Lock()

    async def connect(self) -> bool:
        async with self._connecting:
            return self.writer is not None or await self._connect()

    async def _connect(self) -> bool:
        try:
            reader, writer = await asyncio.open_unix_connection("\0" + self.name.removeprefix("@"))
        except OSError:
            return False
        sock = writer.get_extra_info("socket")
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != 0:  # a relay that is gone, and a user took its name
            log.warning("%s is served by uid %d, not a relay; not using it", self.name, uid)
            writer.close()
            return False
        self.writer = writer
        self._reader_task = asyncio.create_task(self._read(reader))
        return True

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                self.wake.set()
        self.wake.set()
        self.writer = None

    async def send(self, message: msgspec.Struct) -> bool:
        if self.writer is None:
            return False
        try:
            self.writer.write(msgspec.json.encode(message) + b"\n")
            await self.writer.drain()
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self._reader_task:
            self._reader_task.cancel()
