"""HTTP side of the web console (aiohttp): pages, the JSON API the pages call, the live tail (SSE)
and live session joins (WebSocket). Every answer carries the security headers of core.py; every
API call needs a console session, every change also its CSRF token and this console's Origin."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml
from aiohttp import WSMsgType, web

from ringfence.config import parse_listen

from . import core
from .core import ConsoleError, ConsoleSession

if TYPE_CHECKING:
    from .adapter import Console

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
VENDOR_MISSING = "vendor assets missing: run `make setup` (scripts/web_assets.sh fetches them)"
SSE_KEEPALIVE = 15.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on everything; a ConsoleError becomes the answer with its message."""
    try:
        response = await handler(request)
    except ConsoleError as exc:
        if request.path.startswith("/api/"):
            response = _json({"error": str(exc)}, exc.status)
        else:
            response = web.Response(text=_page("Ringfence console", str(exc)), status=exc.status,
                                    content_type="text/html")
    except web.HTTPException as exc:
        response = exc
    except Exception:
        log.exception("console: %s %s failed", request.method, request.path)
        response = _json({"error": "internal error in the web console; see its log"}, 500)
    if not response.prepared:  # a stream (SSE, WebSocket) already sent its headers
        response.headers.update(core.SECURITY_HEADERS)
    return response


def _page(title: str, message: str) -> str:
    """A page with no script: used for sign-in failures."""
    esc = message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="stylesheet" href="/static/app.css"></head>'
            f'<body><main class="signin"><h1>{title}</h1><p class="error" role="alert">{esc}</p></main></body></html>')


class HttpServer:
    def __init__(self, console: Console, args: argparse.Namespace) -> None:
        self.console = console
        self.host, self.port = parse_listen(args.listen)
        self.public_url = (args.public_url or "").rstrip("/")
        self.ssl: ssl.SSLContext | None = None
        if args.tls_cert:
            self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl.load_cert_chain(args.tls_cert, args.tls_key)
        self.runner: web.AppRunner | None = None
        self.streams: set[asyncio.Event] = set()  # open tails and joins, ended at stop

    async def start(self) -> str:
        app = web.Application(middlewares=[_guard], client_max_size=core.MAX_YAML_BYTES + 65536)
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/login", self.login)
        r.add_static("/static/", STATIC, follow_symlinks=False, append_version=False)
        r.add_get("/api/me", self.me)
        r.add_post("/api/logout", self.logout)
        r.add_get("/api/events", self.events)
        r.add_get("/api/events/live", self.events_live)
        r.add_get("/api/recordings", self.recordings)
        r.add_get("/api/recordings/{sid}.cast", self.recording)
        r.add_get("/api/sessions", self.active)
        r.add_post("/api/sessions/{sid}/kill", self.kill)
        r.add_get("/api/sessions/{sid}/join", self.join)
        r.add_get("/api/locks", self.locks)
        r.add_post("/api/locks", self.lock)
        r.add_delete("/api/locks/{name}", self.remove_lock)
        r.add_post("/api/unlock", self.unlock)
        r.add_get("/api/resources/{kind}", self.resources)
        r.add_get("/api/resources/{kind}/{name}", self.resources)
        r.add_post("/api/resources", self.apply)
        r.add_delete("/api/resources/{kind}", self.remove)  # network_restrictions and the other singletons
        r.add_delete("/api/resources/{kind}/{name}", self.remove)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)  # open tails end at stop
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        return self.public_url or f"{'https' if self.ssl else 'http'}://{host}:{port}"

    async def stop(self) -> None:
        for ended in self.streams:
            ended.set()
        if self.runner is not None:
            await self.runner.cleanup()

    # --- sessions and guards ----------------------------------------------------------------------------

    def session(self, request: web.Request) -> ConsoleSession:
        return self.console.sessions.get(request.cookies.get(core.COOKIE), time.time())

    def writer(self, request: web.Request) -> ConsoleSession:
        """The session of a request that changes something, after the CSRF and Origin checks."""
        session = self.session(request)
        core.check_write(session, request.headers.get(core.CSRF_HEADER), request.headers.get("Origin"),
                         self.host_of(request))
        return session

    def host_of(self, request: web.Request) -> str:
        """The host browsers reach the console by: the public URL's behind a proxy."""
        return urlsplit(self.public_url).netloc if self.public_url else request.host

    async def body(self, request: web.Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            raise ConsoleError("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise ConsoleError("the request body must be a JSON object")
        return data

    # --- pages and sign-in ------------------------------------------------------------------------------

    async def index(self, _request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def login(self, request: web.Request) -> web.StreamResponse:
        session = self.console.sessions.redeem(request.query.get("token", ""), time.time())
        log.info('console session started for "%s"', session.user)
        response = web.HTTPSeeOther("/")
        response.set_cookie(core.COOKIE, session.id, max_age=int(session.expires - time.time()), path="/",
                            httponly=True, samesite="Strict", secure=self.ssl is not None or
                            self.public_url.startswith("https:"))
        return response

    async def me(self, request: web.Request) -> web.StreamResponse:
        session = self.session(request)
        return _json({"user": session.user, "csrf": session.csrf, "expires": session.expires,
                      "vendor": (STATIC / "vendor" / "xterm.mjs").exists()})

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self.writer(request)
        self.console.sessions.end(session.id)
        response = _json({"message": "signed out"})
        response.del_cookie(core.COOKIE, path="/")
        return response

    # --- audit events ----------------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.console.search(self.session(request), dict(request.query)))

    async def events_live(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: each new audit event as one `data:` line, until the page goes."""
        session = self.session(request)
        core.check_origin(request.headers.get("Origin"), self.host_of(request))
        types = core.search_request({"type": request.query.get("type", "")}, _now()).event_types
        await self.console.may_tail(session, types)
        response = web.StreamResponse(headers={**core.SECURITY_HEADERS, "Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
        await response.prepare(request)
        events = self.console.follow(types, SSE_KEEPALIVE)
        try:
            await response.write(b": following\n\n")
            async for data in events:
                await response.write(b": keepalive\n\n" if data is None else
                                     b"data: " + data.replace(b"\n", b" ") + b"\n\n")
        except ConnectionResetError:  # the page went away
            pass
        finally:
            await events.aclose()
        return response

    # --- recordings --------------------------------------------------------------------------------------

    async def recordings(self, request: web.Request) -> web.StreamResponse:
        return _json({"recordings": await self.console.recordings(self.session(request), dict(request.query))})

    async def recording(self, request: web.Request) -> web.StreamResponse:
        text = await self.console.recording(self.session(request), request.match_info["sid"])
        return web.Response(text=text, content_type="text/plain", headers={"Cache-Control": "no-store"})

    # --- active sessions ----------------------------------------------------------------------------------

    async def active(self, request: web.Request) -> web.StreamResponse:
        self.session(request)  # as `sessions ls`: governed by the console's NATS credential, no role
        return _json({"sessions": self.console.active_sessions()})

    async def kill(self, request: web.Request) -> web.StreamResponse:
        session = self.writer(request)
        body = await self.body(request)
        message = str(body.get("message") or "")[: core.MAX_TEXT]
        sid = request.match_info["sid"]
        await self.console.kill(session, sid, message)
        return _json({"message": f'session "{sid}" has been terminated'})

    async def join(self, request: web.Request) -> web.StreamResponse:
        """WebSocket: the session's output as JSON messages; the page's token in ?csrf= (a browser
        cannot set headers on a WebSocket), and this console's Origin."""
        session = self.session(request)
        core.check_write(session, request.query.get("csrf"), request.headers.get("Origin"), self.host_of(request))
        ws = web.WebSocketResponse(heartbeat=20.0)
        ws.headers.update(core.SECURITY_HEADERS)
        await ws.prepare(request)
        ended = asyncio.Event()
        self.streams.add(ended)

        async def from_browser() -> None:  # a closed page ends the join
            async for msg in ws:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
            ended.set()

        async def send(message: dict) -> None:
            await ws.send_str(json.dumps(message))

        reader = asyncio.create_task(from_browser())
        try:
            await self.console.join(session, request.match_info["sid"], send, ended)
        except ConsoleError as exc:
            with contextlib.suppress(Exception):
                await send({"error": str(exc)})
        except ConnectionResetError:
            pass
        finally:
            self.streams.discard(ended)
            reader.cancel()
            await ws.close()
        return ws

    # --- locks ---------------------------------------------------------------------------------------------

    async def locks(self, request: web.Request) -> web.StreamResponse:
        return _json({"locks": await self.console.get(self.session(request), "lock")})

    async def lock(self, request: web.Request) -> web.StreamResponse:
        session = self.writer(request)
        result = await self.console.lock(session, await self.body(request))
        return _json({"name": result.name, "message": result.message})

    async def remove_lock(self, request: web.Request) -> web.StreamResponse:
        session = self.writer(request)
        return _json({"message": await self.console.delete(session, "lock", request.match_info["name"])})

    async def unlock(self, request: web.Request) -> web.StreamResponse:
        session = self.writer(request)
        result = await self.console.unlock(session, await self.body(request))
        return _json({"names": result.names, "message": result.message})

    # --- resources (network restrictions, roles, users) ---------------------------------------------------------

    async def resources(self, request: web.Request) -> web.StreamResponse:
        docs = await self.console.get(self.session(request), request.match_info["kind"],
                                      request.match_info.get("name", ""))
        text = yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True) if docs else ""
        return _json({"items": docs, "yaml": text})

    async def apply(self, request: web.Request) -> web.StreamResponse:
        session = self.writer(request)
        text = (await self.body(request)).get("yaml")
        if not isinstance(text, str):
            raise ConsoleError("yaml: expected the documents as text")
        return _json({"messages": await self.console.apply(session, text)})

    async def remove(self, request: web.Request) -> web.StreamResponse:
        session = self.writer(request)
        message = await self.console.delete(session, request.match_info["kind"], request.match_info.get("name", ""))
        return _json({"message": message})


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
