"""max_connections leases, fleet-wide, each node writing only its own keys.

A user's leases on node N live in `conn.<user>.<N>` (names.lease_key) of the leases
bucket; a node's NATS credential may write only `conn.*.<its server_id>`, so no node can
take, extend or drop another node's leases (runtime/nats_security.py).

Without a shared key there is no compare-and-set over the user's whole count; the order
of the bucket's stream decides instead. Every lease has a *position*: the stream sequence
of the write that first stored it (`since`; 0 in that very write, which then means the
entry's own revision). To take a slot a node first writes its lease, then reads every node's
leases of the user (a checked snapshot: everything stored before its write is in it) and
keeps the lease only if fewer than `limit` live leases have an earlier position; otherwise
it takes its lease back and tries again until SLOT_WAIT is over. Two nodes racing for the
last slot see each other in the same order, so exactly the earlier one keeps it; a lease
that is about to be taken back may make a later one wait, never the reverse (no
over-admission). A node that dies stops renewing: its leases stop counting after the TTL.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from msgspec import Struct
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NoStreamResponseError, ServiceUnavailableError
from nats.js.kv import KeyValue

from ringfence.contract import names
from ringfence.runtime import kv_read
from ringfence.runtime.retrying import LEADER_WAIT, retrying

CAS_ATTEMPTS = 50
LEADERLESS = (NatsTimeoutError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError)
# A full count is looked at again for this long before a connection is refused: the
# ssh client of a connection that just ended exits before its sshd has torn the
# connection down, so `ssh host a; ssh host b` at max_connections 1 would race it.
SLOT_WAIT = 1.5
SLOT_RETRY = 0.05


class Lease(Struct):
    sid: str
    server_id: str
    expires: float  # unix seconds
    since: int = 0  # stream sequence of the write that first stored it; 0: the entry's own revision


class NodeLeases(Struct):
    leases: list[Lease] = msgspec.field(default_factory=list)


# --- pure ---------------------------------------------------------------------------------------------
def positioned(leases: list[Lease], revision: int) -> list[Lease]:
    """The leases of one entry with every position filled in."""
    return [Lease(x.sid, x.server_id, x.expires, x.since or revision) for x in leases]


def earlier_live(entries: list[tuple[int, list[Lease]]], position: int, now: float, sid: str) -> int:
    """How many live leases (other than `sid`) of the user hold a position before `position`;
    `entries`: (revision, leases) per node key."""
    return sum(1 for revision, leases in entries for x in positioned(leases, revision)
               if x.expires > now and x.sid != sid and x.since < position)


class ConnectionLeases:
    def __init__(self, kv: KeyValue, server_id: str, ttl: float, js: JetStreamContext) -> None:
        self.kv = kv
        self.js = js
        self.server_id = server_id
        self.ttl = ttl  # seconds a dead node's leases keep counting (ssh_service.connection_lease_ttl)
        self.held: dict[str, str] = {}  # sid -> user, leases this node holds

    async def _write_own(self, user: str, change) -> int:
        """Apply `change(own leases, positions filled in) -> new list` to this node's key of `user`
        with compare-and-set (other tasks of this node write it too); the new revision. While the
        stream elects a leader (a NATS node died) it waits up to LEADER_WAIT (within the 15 s the
        PAM hook waits for admission)."""
        key = names.lease_key(user, self.server_id)
        conflicts = 0

        async def attempt() -> int:
            nonlocal conflicts
            while True:
                entry = await kv_read.get(self.kv, key, deadline=LEADER_WAIT)
                revision = entry.revision if entry else 0
                current = positioned(_decode(entry.value), revision) if entry and entry.value else []
                data = msgspec.json.encode(NodeLeases(change(current)))
                try:
                    if entry is None:  # create() also takes over a key someone deleted
                        return await self.kv.create(key, data)
                    return await self.kv.update(key, data, last=revision)
                except KeyWrongLastSequenceError:
                    conflicts += 1
                    if conflicts >= CAS_ATTEMPTS:
                        raise RuntimeError(f"the connection leases of {user} stayed contended for {CAS_ATTEMPTS} "
                                           "attempts") from None
                    await asyncio.sleep(0.002)

        return await retrying(attempt, retry_if=LEADERLESS, deadline=LEADER_WAIT, pause=0.1)

    async def _others_before(self, user: str, sid: str, position: int) -> int:
        prefix = names.lease_key(user, self.server_id).rsplit(".", 1)[0]
        entries = await kv_read.snapshot(self.js, self.kv, prefix + ".*", deadline=LEADER_WAIT)
        return earlier_live([(e.revision, _decode(e.value)) for e in entries.values() if e.value], position,
                            time.time(), sid)

    async def acquire(self, user: str, sid: str, limit: int, wait: float = SLOT_WAIT) -> bool:
        """Take a lease for `sid` if fewer than `limit` earlier ones are live, waiting up to `wait`
        seconds for one to be given back."""
        until = time.monotonic() + wait
        while True:
            lease = Lease(sid, self.server_id, time.time() + self.ttl)
            position = await self._write_own(user, lambda own, new=lease: [x for x in own if x.sid != sid] + [new])
            if await self._others_before(user, sid, position) < limit:
                self.held[sid] = user
                return True
            await self._write_own(user, lambda own: [x for x in own if x.sid != sid])
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(SLOT_RETRY)

    async def release(self, sid: str) -> None:
        user = self.held.pop(sid, None)
        if user:
            await self._write_own(user, lambda own: [x for x in own if x.sid != sid])

    async def renew(self) -> None:
        """Extend every lease this node holds (and put back any that was pruned), keeping positions."""
        by_user: dict[str, set[str]] = {}
        for sid, user in self.held.items():
            by_user.setdefault(user, set()).add(sid)
        for user, sids in by_user.items():
            expires = time.time() + self.ttl

            def extend(own: list[Lease], sids=sids, expires=expires) -> list[Lease]:
                kept = {x.sid: x.since for x in own}
                return [Lease(sid, self.server_id, expires, kept.get(sid, 0)) for sid in sorted(sids)]

            await self._write_own(user, extend)


def _decode(raw: bytes | None) -> list[Lease]:
    if not raw:
        return []
    try:
        return msgspec.json.decode(raw, type=NodeLeases).leases
    except msgspec.DecodeError:
        return []  # an unreadable entry holds no lease we could honour
