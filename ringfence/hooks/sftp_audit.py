"""The audit trail of an sftp session, read from the bytes a root relay passes between
the client and OpenSSH's sftp-server.

Pure and standard-library only: the relay runs it under `python3 -I -S`, so nothing
here may import msgspec or ringfence. The relay calls, for each chunk it forwards,

    auditor = SftpAuditor()
    ops = auditor.feed_request(chunk)    # client -> sftp-server stdin
    ops = auditor.feed_response(chunk)   # sftp-server stdout -> client
    ops = auditor.finish()               # once both streams have ended

and gets back the file operations those bytes finished, as plain dicts whose keys are
the fields of ringfence.contract.events.SFTP (the relay adds the session's own). Nothing
here raises on any input: the relay keeps relaying whatever this module makes of it.

Feed a client chunk before forwarding it. When that makes `"client" in auditor.stopped`,
the chunk holds what sftp-server cannot be trusted to read as we did (a request whose
fields run past its length: sftp-server reads them on into the next bytes, acts, then
exits), so a relay that ends the session there instead of forwarding leaves no gap.

Which operations are events follows the original (Teleport: ParseSFTPEvent in
lib/sshutils/sftp/events.go, SFTPOpenCode..SFTPLinkCode in lib/events/codes.go, the SFTP
and SFTPSummary messages in api/proto/teleport/legacy/types/events/events.proto): open
(TS001), setstat (TS007, lsetstat too), a directory listing (TS010, at opendir), remove
(TS011), mkdir (TS012), rmdir (TS013), rename (TS016, posix-rename too), symlink (TS018)
and hardlink (TS019). Reads and writes are not events of their own: the original sums them
per file (sftp_summary's bytes_read and bytes_written); here a file's close (TS002) carries
its sums (bytes_exact False when a server-side copy moved an amount SFTP does not tell),
and fsetstat (TS008) names its file. Stat, realpath, readlink and the read-only extensions
are not audited, as there. An event whose action is 0 (the original's INVALID) says a
stream stopped being audited, and why.

The protocol is SFTP v3 (draft-ietf-secsh-filexfer-02) as OpenSSH speaks it: uint32
length-prefixed packets, answered in order and matched here by request id. Everything a
client can make grow is bounded; what does not fit is counted in `counters`.
"""

from __future__ import annotations

import time

# Packet types (draft-ietf-secsh-filexfer-02 section 3).
INIT, VERSION = 1, 2
OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT, OPENDIR, READDIR = range(3, 13)
REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(13, 21)
STATUS, HANDLE, DATA, NAME, ATTRS = range(101, 106)
EXTENDED, EXTENDED_REPLY = 200, 201

# The original's SFTPAction enum (events.proto, see above); an event's code is
# "TS" + the action's three digits + "I", or "E" when the server refused it.
ACTION_INVALID, ACTION_OPEN, ACTION_CLOSE = 0, 1, 2
ACTION_SETSTAT, ACTION_FSETSTAT, ACTION_READDIR, ACTION_REMOVE, ACTION_MKDIR, ACTION_RMDIR = 7, 8, 10, 11, 12, 13
ACTION_RENAME, ACTION_SYMLINK, ACTION_LINK = 16, 18, 19

STATUS_OK = 0
STATUS_TEXT = ("ok", "end of file", "no such file", "permission denied", "failure", "bad message",
               "no connection", "connection lost", "operation unsupported")

# Open flags and attribute flags (section 6.3 and 5).
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME, ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000

# OpenSSH's SFTP_MAX_MSG_LENGTH: sftp-server exits on a longer request, sftp on a longer reply.
MAX_PACKET = 256 * 1024
MAX_PATH = 4096  # bytes of a path kept in an event (Linux PATH_MAX); longer ones are cut
MAX_HANDLE = 256  # the draft's limit; sftp-server treats a longer handle as invalid
MAX_ERROR = 256  # bytes of a server message kept
MAX_PENDING = 16384  # requests awaiting their answer
MAX_HANDLES = 1024  # open handles followed (sftp-server's own limit is its RLIMIT_NOFILE)
MAX_STATE_BYTES = 8 * 1024 * 1024  # path text held for pending requests and open handles

_KEEP_WRITE = 512  # of a WRITE request only the head is kept: type, id, handle, offset, length
_KEEP_REPLY = 1024  # of a reply only the head: nothing after a status message is read
_COUNTERS = ("truncated_paths", "untracked_requests", "untracked_handles", "unknown_handles",
             "unmatched_responses", "unmeasured_copies")


class _Short(Exception):
    """A field runs past the end of its packet."""


class _Garbage(Exception):
    """The stream is not SFTP any more; the message says where and why."""


class _Reader:
    """Fields of one packet. `data` may hold only the head of a packet `size` bytes long."""

    __slots__ = ("data", "pos", "size")

    def __init__(self, data, size: int, pos: int) -> None:
        self.data, self.size, self.pos = data, size, pos

    def u32(self) -> int:
        end = self.pos + 4
        if end > len(self.data):
            raise _Short
        value = int.from_bytes(self.data[self.pos:end], "big")
        self.pos = end
        return value

    def u64(self) -> int:
        return (self.u32() << 32) | self.u32()

    def string(self) -> bytes:
        """The string, or the part of it that was kept of a long packet."""
        n = self.u32()
        end = self.pos + n
        if end > self.size:
            raise _Short
        value = bytes(self.data[self.pos:min(end, len(self.data))])
        self.pos = end
        return value

    def handle(self) -> bytes | None:
        """A handle, or None for one sftp-server would refuse as too long (never kept)."""
        handle = self.string()
        return handle if len(handle) < MAX_HANDLE else None

    def attrs(self) -> dict | None:
        """ATTRS (section 5) as the original's SFTPAttributes JSON; None when no attribute is set."""
        flags = self.u32()
        out: dict = {}
        if flags & ATTR_SIZE:
            out["file_size"] = self.u64()
        if flags & ATTR_UIDGID:
            out["uid"] = self.u32()
            out["gid"] = self.u32()
        if flags & ATTR_PERMISSIONS:
            out["permissions"] = self.u32()
        if flags & ATTR_ACMODTIME:
            out["access_time"] = _rfc3339(self.u32())
            out["modification_time"] = _rfc3339(self.u32())
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):  # each pair needs 8 bytes, so a huge count ends at the packet's end
                self.string()
                self.string()
        return out or None


def _rfc3339(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class _Framer:
    """Cuts one direction into packets (uint32 length, then that many bytes) and hands each
    to `on_packet(body, size)`. It keeps at most `keep(type, size)` bytes of a body, so a
    4 GiB length field or a 256 KiB write costs no more than that."""

    def __init__(self, name: str, on_packet, keep, max_packet: int) -> None:
        self.name, self.on_packet, self.keep, self.max_packet = name, on_packet, keep, max_packet
        self.offset = 0  # stream bytes before the packet being collected
        self._head = bytearray()  # its length field so far
        self._body = bytearray()  # the part of its body being kept
        self._size = 0  # its body's length
        self._left = 0  # body bytes still to come
        self._keep: int | None = 0  # body bytes to keep

    def _check(self, size: int) -> None:
        if not 1 <= size <= self.max_packet:
            raise _Garbage(f"packet length {size} at byte {self.offset} of the {self.name} stream is outside "
                           f"1..{self.max_packet} (OpenSSH's limit)")

    def feed(self, data) -> None:
        view = memoryview(data).cast("B")
        i, n = 0, len(view)
        while i < n:
            if not self._left:
                if not self._head and n - i >= 4:  # a whole packet in this chunk: no copy
                    size = int.from_bytes(view[i:i + 4], "big")
                    self._check(size)
                    if n - i - 4 >= size:
                        self.on_packet(view[i + 4:i + 4 + size], size)
                        i += 4 + size
                        self.offset += 4 + size
                        continue
                take = min(4 - len(self._head), n - i)
                self._head += view[i:i + take]
                i += take
                if len(self._head) < 4:
                    break
                size = int.from_bytes(self._head, "big")
                self._head.clear()
                self._check(size)
                self._size = self._left = size
                self._keep = None  # known once the type byte is here
                continue
            if self._keep is None:  # the type byte decides how much is kept
                self._keep = self.keep(view[i], self._size)
            take = min(self._left, n - i)
            want = self._keep - len(self._body)
            if want > 0:
                self._body += view[i:i + min(take, want)]
            i += take
            self._left -= take
            if not self._left:
                body = bytes(self._body)
                self._body.clear()
                self.on_packet(body, self._size)
                self.offset += 4 + self._size

    def held(self) -> int:
        return len(self._head) + len(self._body)


def _event(action: int, path: str = "", target_path: str = "", flags: int = 0,
           attributes: dict | None = None, truncated: bool = False) -> dict:
    """An operation, with the keys of contract.events.SFTP; status None until the server answers."""
    return {"action": action, "path": path, "target_path": target_path, "flags": flags, "attributes": attributes,
            "status": None, "error": "", "bytes_read": 0, "bytes_written": 0, "bytes_exact": True,
            "truncated": truncated}


# Pending request kinds and the reply types each accepts (anything else is someone else's reply).
_EVENT, _OPENING, _FSETSTAT, _READ, _WRITE, _CLOSE, _COPY, _OTHER = range(8)
_ACCEPTS = {_EVENT: (STATUS,), _OPENING: (HANDLE, STATUS), _FSETSTAT: (STATUS,), _READ: (DATA, STATUS),
            _WRITE: (STATUS,), _CLOSE: (STATUS,), _COPY: (STATUS,), _OTHER: None}
# Requests that are events as soon as answered: packet type (or extension name) -> action.
_PATH_ACTIONS = {REMOVE: ACTION_REMOVE, RMDIR: ACTION_RMDIR}
_TWO_PATH_ACTIONS = {RENAME: ACTION_RENAME, SYMLINK: ACTION_SYMLINK, b"posix-rename@openssh.com": ACTION_RENAME,
                     b"hardlink@openssh.com": ACTION_LINK}
_READ_ONLY = frozenset({LSTAT, FSTAT, READDIR, REALPATH, STAT, READLINK})
_REQUEST_NAMES = dict(zip(range(OPEN, SYMLINK + 1), (
    "open", "close", "read", "write", "lstat", "fstat", "setstat", "fsetstat", "opendir", "readdir", "remove",
    "mkdir", "rmdir", "realpath", "stat", "rename", "readlink", "symlink"), strict=True)) | {EXTENDED: "extended"}


class SftpAuditor:
    """Follows one sftp session. See the module docstring for the calls the relay makes."""

    def __init__(self, *, max_packet: int = MAX_PACKET, max_path: int = MAX_PATH, max_pending: int = MAX_PENDING,
                 max_handles: int = MAX_HANDLES, max_state_bytes: int = MAX_STATE_BYTES) -> None:
        self.max_path, self.max_pending, self.max_handles = max_path, max_pending, max_handles
        self.max_state_bytes = max_state_bytes
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.stopped: dict[str, str] = {}  # stream name -> why it is no longer read
        self._requests = _Framer("client", self._on_request,
                                 lambda t, size: _KEEP_WRITE if t == WRITE else size, max_packet)
        self._responses = _Framer("server", self._on_response, lambda t, size: _KEEP_REPLY, max_packet)
        self._pending: dict[int, list] = {}  # request id -> [(kind, accepts, data, cost)] in request order
        self._n_pending = 0
        self._handles: dict[bytes, list] = {}  # handle -> [event of its open/close, is_dir]
        self._state_bytes = 0
        self._out: list[dict] = []

    # --- the relay's calls -----------------------------------------------------------------
    def feed_request(self, data) -> list[dict]:
        """Bytes on their way from the client to sftp-server; the operations they finished."""
        return self._feed(self._requests, data)

    def feed_response(self, data) -> list[dict]:
        """Bytes on their way from sftp-server to the client; the operations they finished."""
        return self._feed(self._responses, data)

    def finish(self) -> list[dict]:
        """Both streams ended: requests never answered (status None) and files never closed
        (a close with status None and the bytes moved so far)."""
        self._give_up_pending()
        for event, is_dir in self._handles.values():
            if not is_dir:
                self._out.append(event)
        self._handles.clear()
        self._state_bytes = 0
        return self._take()

    def held_bytes(self) -> int:
        """Bytes of packets being collected: at most 4 + max_packet per stream."""
        return self._requests.held() + self._responses.held()

    # --- framing -----------------------------------------------------------------------------
    def _feed(self, framer: _Framer, data) -> list[dict]:
        if framer.name in self.stopped:
            return []
        try:
            framer.feed(data)
        except _Garbage as exc:
            self._stop(framer.name, str(exc))
        except Exception as exc:  # a bug here must not cost the relay its session; it is reported as an event
            self._stop(framer.name, f"internal error at byte {framer.offset} of the {framer.name} stream: "
                                    f"{type(exc).__name__}: {exc}")
        return self._take()

    def _stop(self, stream: str, reason: str) -> None:
        """Stop reading a stream and say so in the trail (action 0, the original's INVALID)."""
        self.stopped[stream] = reason
        self._out.append(dict(_event(ACTION_INVALID), error=f"sftp audit of the {stream} stream stopped: {reason}"))
        if stream == "server":  # no answers will come
            self._give_up_pending()

    def _give_up_pending(self) -> None:
        """What still waits for an answer is an operation of unknown outcome."""
        pending, self._pending, self._n_pending = self._pending, {}, 0
        for entries in pending.values():
            for entry in entries:
                self._state_bytes -= entry[3]
                self._unanswered(entry)

    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    # --- requests ------------------------------------------------------------------------------
    def _on_request(self, body, size: int) -> None:
        kind = body[0]
        if kind == INIT or not (OPEN <= kind <= SYMLINK or kind == EXTENDED):
            return  # INIT has no id; sftp-server answers no unknown type
        r = _Reader(body, size, 1)
        try:
            rid = r.u32()
            self._request(kind, rid, r)
        except _Short:
            # sftp-server reads such a field on into the next packet, acts on it, then exits:
            # we cannot know what it did, so the trail says so and stops here.
            raise _Garbage(f"{_REQUEST_NAMES.get(kind, kind)} request at byte {self._requests.offset} of the client "
                           f"stream has a field running past its {size} bytes (sftp-server would read on into "
                           f"the next bytes, act, and exit)") from None

    def _request(self, kind: int, rid: int, r: _Reader) -> None:
        if kind == OPEN:
            path, cut = self._path(r.string())
            flags = r.u32()
            self._expect(rid, _OPENING, _event(ACTION_OPEN, path, flags=flags, attributes=r.attrs(), truncated=cut))
        elif kind == OPENDIR:
            path, cut = self._path(r.string())
            self._expect(rid, _OPENING, _event(ACTION_READDIR, path, truncated=cut))
        elif kind in (READ, WRITE, CLOSE):
            handle = r.handle()
            if handle is None:  # sftp-server refuses it: nothing read, written or closed
                self._expect(rid, _OTHER, None)
            elif kind == WRITE:
                r.u64()
                n = r.u32()
                if r.pos + n > r.size:
                    raise _Short
                self._expect(rid, _WRITE, (handle, n))
            else:
                self._expect(rid, _READ if kind == READ else _CLOSE, handle)
        elif kind in (SETSTAT, MKDIR):
            path, cut = self._path(r.string())
            action = ACTION_SETSTAT if kind == SETSTAT else ACTION_MKDIR
            self._expect(rid, _EVENT, _event(action, path, attributes=r.attrs(), truncated=cut))
        elif kind == FSETSTAT:
            # Its file is looked up when answered: by then the handle means what it meant to
            # sftp-server (a pipelined close and open can give it to another file).
            handle = r.handle()
            event = _event(ACTION_FSETSTAT, attributes=r.attrs())
            self._expect(rid, _FSETSTAT, (handle, event))
        elif kind in _PATH_ACTIONS:
            path, cut = self._path(r.string())
            self._expect(rid, _EVENT, _event(_PATH_ACTIONS[kind], path, truncated=cut))
        elif kind in _TWO_PATH_ACTIONS:
            self._expect(rid, _EVENT, self._two_paths(_TWO_PATH_ACTIONS[kind], r))
        elif kind in _READ_ONLY:
            self._expect(rid, _OTHER, None)
        else:  # EXTENDED
            self._extended(rid, r.string(), r)

    def _extended(self, rid: int, name: bytes, r: _Reader) -> None:
        if name in _TWO_PATH_ACTIONS:
            self._expect(rid, _EVENT, self._two_paths(_TWO_PATH_ACTIONS[name], r))
        elif name == b"lsetstat@openssh.com":
            path, cut = self._path(r.string())
            self._expect(rid, _EVENT, _event(ACTION_SETSTAT, path, attributes=r.attrs(), truncated=cut))
        elif name == b"copy-data":
            src, _offset, length, dst = r.handle(), r.u64(), r.u64(), r.handle()
            if src is None or dst is None:
                self._expect(rid, _OTHER, None)
            else:
                self._expect(rid, _COPY, (src, length, dst))
        else:  # statvfs, fstatvfs, fsync, limits, expand-path, home-directory, users-groups-by-id, unknown
            self._expect(rid, _OTHER, None)

    def _two_paths(self, action: int, r: _Reader) -> dict:
        """Rename and link: old then new path. Symlink in OpenSSH's (reversed) order: the
        link's target, then the link; the original keeps them as path and target_path."""
        path, cut = self._path(r.string())
        target, cut2 = self._path(r.string())
        return _event(action, path, target, truncated=cut or cut2)

    def _path(self, raw: bytes) -> tuple[str, bool]:
        cut = len(raw) > self.max_path
        if cut:
            raw = raw[:self.max_path]
            self.counters["truncated_paths"] += 1
        return raw.decode("utf-8", "backslashreplace"), cut

    def _name_file(self, handle_event: tuple) -> dict:
        """The fsetstat event with its handle's file (path "" for a handle not followed)."""
        handle, event = handle_event
        known = self._handles.get(handle) if handle is not None else None
        if known is None:
            self.counters["unknown_handles"] += 1
        else:
            event["path"], event["truncated"] = known[0]["path"], known[0]["truncated"]
        return event

    def _expect(self, rid: int, kind: int, data) -> None:
        """Wait for the answer to request `rid`; when that cannot be followed, an event
        still goes into the trail now, with status None."""
        cost = len(data["path"]) + len(data["target_path"]) if kind in (_EVENT, _OPENING) else 0
        entry = (kind, _ACCEPTS[kind], data, cost)
        if ("server" in self.stopped or self._n_pending >= self.max_pending
                or self._state_bytes + cost > self.max_state_bytes):
            if "server" not in self.stopped:
                self.counters["untracked_requests"] += 1
            self._unanswered(entry)
            return
        self._pending.setdefault(rid, []).append(entry)
        self._n_pending += 1
        self._state_bytes += cost

    def _unanswered(self, entry) -> None:
        kind, _accepts, data, _cost = entry
        if kind in (_EVENT, _OPENING):
            self._out.append(data)
        elif kind == _FSETSTAT:
            self._out.append(self._name_file(data))
        elif kind == _CLOSE:  # the client is done with the file either way
            self._closed(data, None, "")
        elif kind == _COPY:
            self._copied(data, None)

    # --- responses ------------------------------------------------------------------------------
    def _on_response(self, body, size: int) -> None:
        kind = body[0]
        if kind == VERSION or kind < STATUS:
            return
        r = _Reader(body, size, 1)
        try:
            rid = r.u32()
            entry = self._match(rid, kind)
            if entry is not None:
                self._answer(entry, kind, r)
        except _Short:
            raise _Garbage(f"reply type {kind} at byte {self._responses.offset} of the server stream has a field "
                           f"running past its {size} bytes") from None

    def _match(self, rid: int, kind: int):
        entries = self._pending.get(rid)
        if not entries or (entries[0][1] is not None and kind not in entries[0][1]):
            self.counters["unmatched_responses"] += 1
            return None
        entry = entries.pop(0)
        if not entries:
            del self._pending[rid]
        self._n_pending -= 1
        self._state_bytes -= entry[3]
        return entry

    def _answer(self, entry, reply: int, r: _Reader) -> None:
        kind, _accepts, data, _cost = entry
        status, error = STATUS_OK, ""
        if reply == STATUS:
            status = r.u32()
            message = r.string()[:MAX_ERROR] if r.pos < r.size else b""  # v3 adds a message
            if status != STATUS_OK:
                error = message.decode("utf-8", "backslashreplace") or _status_text(status)
        if kind == _EVENT:
            self._settled(data, status, error)
        elif kind == _FSETSTAT:
            self._settled(self._name_file(data), status, error)
        elif kind == _OPENING:
            self._settled(data, status, error)
            if reply == HANDLE:
                self._opened(r.handle(), data)
        elif kind == _READ:
            if reply == DATA:
                n = r.u32()
                if r.pos + n > r.size:
                    raise _Short
                self._count(data, n, 0)
        elif kind == _WRITE:
            if status == STATUS_OK:
                self._count(data[0], 0, data[1])
        elif kind == _CLOSE:
            self._closed(data, status, error)
        elif kind == _COPY:
            self._copied(data, status)

    def _settled(self, event: dict, status: int, error: str) -> None:
        event["status"], event["error"] = status, error
        self._out.append(event)

    def _opened(self, handle: bytes | None, opened: dict) -> None:
        cost = len(opened["path"])
        if (handle is None or len(self._handles) >= self.max_handles
                or self._state_bytes + cost > self.max_state_bytes):
            self.counters["untracked_handles"] += 1
            return
        old = self._handles.pop(handle, None)
        if old is not None:  # the server reused a handle we saw no close for
            self._state_bytes -= len(old[0]["path"])
        close = _event(ACTION_CLOSE, opened["path"], truncated=opened["truncated"])
        self._handles[handle] = [close, opened["action"] == ACTION_READDIR]
        self._state_bytes += cost

    def _count(self, handle: bytes, read: int, written: int) -> None:
        known = self._handles.get(handle)
        if known is None:
            self.counters["unknown_handles"] += 1
            return
        known[0]["bytes_read"] += read
        known[0]["bytes_written"] += written

    def _copied(self, copy: tuple, status: int | None) -> None:
        """copy-data moves bytes inside the server. Its reply tells the amount only when a
        length was asked and all of it was copied; otherwise (to end of file, cut short by
        it, failed midway) the two files' sums become lower bounds."""
        src, length, dst = copy
        if status == STATUS_OK and length:
            self._count(src, length, 0)
            self._count(dst, 0, length)
            return
        self.counters["unmeasured_copies"] += 1
        for handle in (src, dst):
            known = self._handles.get(handle)
            if known is not None:
                known[0]["bytes_exact"] = False

    def _closed(self, handle: bytes, status: int | None, error: str) -> None:
        """sftp-server frees a handle on close whatever close(2) said."""
        known = self._handles.pop(handle, None)
        if known is None:
            self.counters["unknown_handles"] += 1
            return
        close, is_dir = known
        self._state_bytes -= len(close["path"])
        if not is_dir:
            self._settled(close, status, error)


def _status_text(status: int) -> str:
    return STATUS_TEXT[status] if status < len(STATUS_TEXT) else f"status {status}"
