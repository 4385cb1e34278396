"""Session recordings, as asciicast v2 chunks.

A relay journals its session's terminal stream (ringfence/hooks/relay.py:
`started`, then numbered `rec` lines, then `exit`); each becomes one
RecordingChunk with a sequence number derived from the journal (header 0,
rec n -> n + 1, the end after the last rec), so a line read twice makes the
same chunk. Chunks go to a durable spool (published to JetStream for the
audit service to store) and at once to the session's joiners (joins.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from nats.js import JetStreamContext

from ringfence.contract import names, recording
from ringfence.contract.api import SessionInfo
from ringfence.contract.recording import CastHeader, RecordingChunk

from .spool import Spool

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"


class Recorder:
    def __init__(self, spool: Spool, live: Callable[[RecordingChunk], None]) -> None:
        self.spool = spool
        self.live = live  # to the session's joiners, as it happens

    def _ship(self, info: SessionInfo, seq: int, events: list[tuple[float, str, str]],
              header: CastHeader | None = None, end: bool = False) -> None:
        chunk = RecordingChunk(
            sid=info.sid, seq=seq, events=events, header=header, end=end, user=info.user, login=info.login,
            server_id=info.server_id, server_hostname=info.server_hostname, started=info.started,
        )
        self.spool.append(recording.encode(chunk))
        self.live(chunk)

    def header(self, info: SessionInfo, width: int, height: int, timestamp: int, term: str) -> None:
        title = f"{info.user}@{info.server_hostname} {info.sid}"
        self._ship(info, 0, [], CastHeader(width=width, height=height, timestamp=timestamp, title=title,
                                           env={"TERM": term} if term else {}))

    def events(self, info: SessionInfo, seq: int, events: list[tuple[float, str, str]]) -> None:
        self._ship(info, seq, events)

    def finish(self, info: SessionInfo, seq: int) -> None:
        self._ship(info, seq, [], end=True)


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
