"""Interactive channels' terminal streams, as asciicast v2 chunks.

Each update from a channel's wrapper becomes one RecordingChunk, appended to a
durable spool (published to JetStream for the audit service to store) and
published at once on the session's live subject for `ringfence sessions join`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext

from ringfence.contract import names, recording
from ringfence.contract.api import SessionInfo
from ringfence.contract.recording import CastHeader, RecordingChunk

from .spool import Spool

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass
class _Active:
    info: SessionInfo
    header: CastHeader
    seq: int = 0


class Recorder:
    def __init__(self, spool: Spool, live: Callable[[str, bytes], None]) -> None:
        self.spool = spool
        self.live = live  # publish on names.live_subject(server_id, sid), best effort
        self.active: dict[str, _Active] = {}

    def begin(self, info: SessionInfo, width: int, height: int, term: str) -> None:
        header = CastHeader(width=width, height=height, timestamp=int(time.time()), title=f"{info.user}@"
                            f"{info.server_hostname} {info.sid}", env={"TERM": term} if term else {})
        self.active[info.sid] = _Active(info, header)

    def _chunk(self, rec: _Active, events: list[tuple[float, str, str]], end: bool = False) -> RecordingChunk:
        info = rec.info
        chunk = RecordingChunk(
            sid=info.sid, seq=rec.seq, events=events, header=rec.header if rec.seq == 0 else None, end=end,
            user=info.user, login=info.login, server_id=info.server_id, server_hostname=info.server_hostname,
            started=info.started,
        )
        rec.seq += 1
        return chunk

    def _ship(self, chunk: RecordingChunk) -> None:
        data = recording.encode(chunk)
        self.spool.append(data)
        self.live(chunk.sid, data)

    def add(self, sid: str, events: list[tuple[float, str, str]]) -> None:
        rec = self.active.get(sid)
        if rec:
            for part in _fitting(events):
                self._ship(self._chunk(rec, part))

    def finish(self, sid: str) -> None:
        rec = self.active.pop(sid, None)
        if rec:
            self._ship(self._chunk(rec, [], end=True))


def _fitting(events: list[tuple[float, str, str]]) -> list[list[tuple[float, str, str]]]:
    """Split events so every chunk stays under recording.MAX_CHUNK_BYTES (JSON
    escaping can make terminal output up to six times longer)."""
    budget = recording.MAX_CHUNK_BYTES // 2
    parts: list[list[tuple[float, str, str]]] = [[]]
    size = 0
    for t, code, data in events:
        for i in range(0, max(len(data), 1), budget // 6):
            piece = (t, code, data[i : i + budget // 6])
            cost = len(msgspec.json.encode(piece))
            if parts[-1] and size + cost > budget:
                parts.append([])
                size = 0
            parts[-1].append(piece)
            size += cost
    return [p for p in parts if p]


class _Envelope(msgspec.Struct):
    sid: str
    seq: int
    server_id: str


_envelope = msgspec.json.Decoder(_Envelope)


async def publish_chunks(js: JetStreamContext, lines: list[bytes], timeout: float = 10.0) -> None:
    """Publish spooled chunks in order; the (sid, seq) message id makes re-sending safe."""
    futures = []
    for line in lines:
        env = _envelope.decode(line)
        futures.append(await js.publish_async(
            names.recording_subject(env.server_id, env.sid), line, headers={MSG_ID_HEADER: f"{env.sid}:{env.seq}"},
            wait_stall=timeout))
    await asyncio.wait_for(asyncio.gather(*futures), timeout)
