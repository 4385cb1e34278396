"""NATS side of the web console: its sign-in API for `ringfence web login`, the control requests
it makes for signed-in operators, and the reads it makes with its own credential (the sessions
bucket, the audit stream), as the CLI does. The HTTP side is routes.py."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from nats.micro.request import Request

from ringfence.auth import HEADER_NKEY, AuthError
from ringfence.cli.resources import Source, parse_documents, renumber, route
from ringfence.contract import api, names, recording
from ringfence.contract.api import ApiError, ApiReply, SessionInfo
from ringfence.contract.batches import BatchError, event_type, events_in
from ringfence.contract.resources import KIND_ALIASES, LOCK_KINDS
from ringfence.contract.strict import DecodeError, decode_json
from ringfence.runtime.kv_mirror import KvMirror
from ringfence.runtime.service import ServiceContext, request_actor

from . import core, live
from .core import ConsoleError, ConsoleSession
from .routes import HttpServer

log = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_TIMEOUT = 25.0  # as the CLI's: a request may wait out a NATS leader election
COUNTERS = ("sign_ins", "sign_in_refused", "requests", "requests_refused", "live_chunks_dropped")


class Console:
    """Everything the pages ask of the fleet, each as the signed-in operator."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sessions = core.Sessions(args.session_ttl)
        self.base_url = ""  # set by routes.py once the listener is bound
        self.ctx: ServiceContext | None = None
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.active: KvMirror[SessionInfo] | None = None
        self.server: HttpServer | None = None
        self.instance = secrets.token_hex(8)  # offers live in this process: the grant comes back here

    # --- service lifecycle --------------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        for name in COUNTERS:
            ctx.counters.setdefault(name, 0)
        self.active = KvMirror(ctx.nc, names.SESSIONS_BUCKET, ">", SessionInfo, counters=ctx.counters)
        # The fleet's active sessions, as `ringfence sessions ls` reads them, kept current.
        self.tasks.append(asyncio.create_task(self.active.run(self.stop_event), name="sessions"))
        await ctx.add_endpoint("offer", names.api_subject(names.WEB_API, "offer"), self._offer, action=_anyone)
        await ctx.add_endpoint("login", self.login_subject, self._login, action=_anyone)
        self.server = HttpServer(self, self.args)
        self.base_url = await self.server.start()
        log.info("web console at %s (sign in with `ringfence web login`)", self.base_url)

    async def stop(self) -> None:
        self.stop_event.set()
        if self.server is not None:
            await self.server.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def login_subject(self) -> str:
        assert self.ctx is not None
        return f"{names.WEB_API}.{self.instance}.login"

    # --- sign-in (`ringfence web login`) ----------------------------------------------------------------

    async def _offer(self, req: Request) -> bytes:
        offer = self.sessions.offer(time.time())
        return api.ok_reply(api.ConsoleOffer(offer=offer.id, session_nkey=offer.public_key,
                                             ttl=self.sessions.session_ttl, login_subject=self.login_subject))

    async def _login(self, req: Request) -> bytes:
        assert self.ctx is not None
        try:
            body = decode_json(req.data, api.ConsoleLoginRequest)
        except DecodeError as exc:
            raise ApiError(f"malformed request: {exc}") from None
        actor = request_actor(req)
        signer = (req.headers or {}).get(HEADER_NKEY, "")
        try:
            token = self.sessions.accept(body.offer, body.grant, signer, actor, time.time())
        except (ConsoleError, AuthError) as exc:
            self.ctx.counters["sign_in_refused"] += 1
            raise ApiError(str(exc), "access_denied") from None
        self.ctx.counters["sign_ins"] += 1
        log.info('one-time sign-in URL issued for "%s"', actor)
        return api.ok_reply(api.ConsoleLoginResult(url=core.login_url(self.base_url, token),
                                                   expires_in=core.LOGIN_TTL))

    # --- control requests as the operator ----------------------------------------------------------------

    async def call(self, session: ConsoleSession, subject: str, body: Any, result_type: type[T]) -> T:
        """The request the CLI would make, signed for the session's operator; ConsoleError with the
        service's own message when it refuses."""
        assert self.ctx is not None
        payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
        self.ctx.counters["requests"] += 1
        try:
            msg = await self.ctx.nc.request(subject, payload, timeout=REQUEST_TIMEOUT,
                                            headers=session.headers(subject, payload, time.time()))
        except NoRespondersError:
            service = subject.split(".")[2]
            raise ConsoleError(f"no {service} service is running (nothing answers {subject})", 503) from None
        except NatsTimeout:
            raise ConsoleError(f"no reply on {subject} within {REQUEST_TIMEOUT:.0f}s", 504) from None
        reply = msgspec.json.decode(msg.data, type=ApiReply)
        if not reply.ok:
            self.ctx.counters["requests_refused"] += 1
            raise ConsoleError(reply.error, core.api_status(reply.kind))
        return msgspec.json.decode(reply.result, type=result_type)

    async def search(self, session: ConsoleSession, query: dict[str, str]) -> dict:
        request = core.search_request(query, dt.datetime.now(dt.UTC))
        result = await self.call(session, names.api_subject(names.AUDIT_API, "search"), request, api.SearchResult)
        return {"events": [json.loads(bytes(raw)) for raw in result.events], "next": result.next_key}

    async def may_tail(self, session: ConsoleSession, types: list[str]) -> None:
        """The live tail is for whoever may search events (the same page): asked as a search."""
        probe = api.SearchRequest(event_types=types, limit=1)
        await self.call(session, names.api_subject(names.AUDIT_API, "search"), probe, api.SearchResult)

    async def follow(self, types: list[str], every: float) -> AsyncIterator[bytes | None]:
        """New audit events as published (as `events tail`); None after `every` seconds without one."""
        assert self.ctx is not None
        try:
            # Everything: kernel events come in batches (ringfence.audit.<node>.batch), whatever their type.
            sub = await self.ctx.js.subscribe(names.AUDIT_SUBJECTS, stream=names.AUDIT_STREAM,
                                              ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
        except NotFoundError:
            raise ConsoleError(f"the audit stream {names.AUDIT_STREAM} does not exist yet", 503) from None
        wanted = set(types)
        try:
            while not self.stop_event.is_set():
                try:
                    msg = await sub.next_msg(timeout=every)
                except NatsTimeout:
                    yield None
                    continue
                try:
                    lines = events_in(msg.subject, msg.headers, msg.data)
                except BatchError:
                    self.ctx.counters["tail_batches_malformed"] = self.ctx.counters.get("tail_batches_malformed", 0) + 1
                    continue
                for line in lines:
                    if not wanted or event_type(line) in wanted:
                        yield line
        finally:
            await sub.unsubscribe()

    async def recordings(self, session: ConsoleSession, query: dict[str, str]) -> list[dict]:
        request = core.recording_list_request(query)
        result = await self.call(session, names.api_subject(names.AUDIT_API, "recordings"), request,
                                 recording.RecordingListResult)
        return [msgspec.to_builtins(r) for r in result.recordings]

    async def recording(self, session: ConsoleSession, sid: str) -> str:
        """The whole .cast text, page by page, as `ringfence play` fetches it."""
        subject = names.api_subject(names.AUDIT_API, "recording")
        parts: list[str] = []
        offset = 0
        while True:
            page = await self.call(session, subject, recording.RecordingGetRequest(sid=core.check_sid(sid),
                                                                                   offset=offset),
                                   recording.RecordingGetResult)
            parts.append(page.data)
            if page.complete or page.next_offset <= offset:
                return "".join(parts)
            offset = page.next_offset

    def active_sessions(self) -> list[dict]:
        assert self.active is not None
        found = sorted(self.active.values.values(), key=lambda s: (s.started, s.sid))
        return [msgspec.to_builtins(s) for s in found]

    def find_session(self, sid: str) -> SessionInfo:
        assert self.active is not None
        sid = core.check_sid(sid)  # keys name the node too (names.session_key)
        info = next((i for i in self.active.values.values() if i.sid == sid), None)
        if info is None:
            raise ConsoleError(f'no active session "{sid}" (it ended, or is not known yet)', 404)
        return info

    async def kill(self, session: ConsoleSession, sid: str, message: str) -> None:
        info = self.find_session(sid)
        await self.call(session, names.enforcer_subject(info.server_id, "kill"),
                        api.KillRequest(sid=sid, message=message), dict)

    async def join(self, session: ConsoleSession, sid: str, send: live.Send, stopped: asyncio.Event) -> None:
        assert self.ctx is not None

        async def call(subject: str, body: object, result_type: type = dict) -> object:
            return await self.call(session, subject, body, result_type)

        await live.join(self.ctx.nc, call, self.find_session(sid), session.user, send, stopped, self.ctx.counters)

    async def get(self, session: ConsoleSession, kind: str, name: str = "") -> list[Any]:
        subject = names.api_subject(_service_api(kind), "get")
        return await self.call(session, subject, api.GetRequest(kind=kind, name=name), list[Any])

    async def delete(self, session: ConsoleSession, kind: str, name: str) -> str:
        subject = names.api_subject(_service_api(kind), "delete")
        return (await self.call(session, subject, api.DeleteRequest(kind=kind, name=name), api.DeleteResult)).message

    async def lock(self, session: ConsoleSession, body: dict) -> api.LockResult:
        return await self.call(session, names.api_subject(names.LOCKS_API, "lock"), core.lock_request(body),
                               api.LockResult)

    async def unlock(self, session: ConsoleSession, body: dict) -> api.UnlockResult:
        request = api.UnlockRequest(target=core.lock_target(body))
        return await self.call(session, names.api_subject(names.LOCKS_API, "unlock"), request, api.UnlockResult)

    async def apply(self, session: ConsoleSession, text: str) -> list[str]:
        """`ringfence create -f` of the editor's YAML: the same parsing, routing and messages."""
        if len(text.encode()) > core.MAX_YAML_BYTES:
            raise ConsoleError(f"the document is larger than {core.MAX_YAML_BYTES >> 20} MiB")
        try:
            sources = parse_documents("<editor>", text.encode())
        except Exception as exc:  # CliError: the message names the line and the problem
            raise ConsoleError(str(exc)) from None
        if not sources:
            raise ConsoleError("no documents found")
        batches = route(sources)
        if len(batches) > 1:  # as create -f: every service checks its documents before any applies
            for api_name, batch in batches.items():
                await self._create(session, api_name, batch, dry_run=True)
        messages: list[str] = []
        for api_name, batch in batches.items():
            messages += await self._create(session, api_name, batch, dry_run=False)
        return messages

    async def _create(self, session: ConsoleSession, api_name: str, batch: list[Source], dry_run: bool) -> list[str]:
        try:
            docs = [msgspec.Raw(msgspec.json.encode(s.doc)) for s in batch]
        except (TypeError, ValueError, msgspec.EncodeError) as exc:  # e.g. a key that is not a string
            raise ConsoleError(f"a document cannot be sent as JSON: {exc}") from None
        request = api.CreateRequest(resources=docs, dry_run=dry_run)
        try:
            result = await self.call(session, names.api_subject(api_name, "create"), request, api.CreateResult)
        except ConsoleError as exc:
            raise ConsoleError(renumber(str(exc), batch, False), exc.status) from None
        return result.messages


async def _anyone(_req: Request) -> list[tuple[str, str]]:
    """Any registered operator may sign in: what they may do is decided request by request."""
    return []


def _service_api(kind: str) -> str:
    canonical = KIND_ALIASES.get(kind)
    if canonical is None:
        raise ConsoleError(f'unknown kind "{kind[:40]}"; use one of {", ".join(KIND_ALIASES)}', 404)
    return names.LOCKS_API if canonical in LOCK_KINDS else names.POLICY_API


def make_adapter(args: argparse.Namespace) -> Console:
    return Console(args)
