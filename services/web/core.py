"""The web console's decisions, without I/O: sign-in, console sessions, CSRF, and turning what a
page sends into the same control requests the CLI makes.

Sign-in (`ringfence web login`): the CLI asks for an offer (a fresh key pair the console keeps),
signs a grant for the offer's public key with the operator's identity, and sends it back; the
console answers with a one-time URL. Opening it (once, within LOGIN_TTL) starts a console session
bound to that operator: a cookie for the browser, and for the services every request signed with
the session's key and carrying the grant (ringfence.auth). The console never holds an operator's
seed; the services check the operator's roles on every request exactly as for the CLI.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ringfence import auth
from ringfence.contract import api
from ringfence.contract.events import EVENT_TYPES
from ringfence.contract.recording import MAX_LIST_LIMIT, RecordingListRequest, is_valid_sid
from ringfence.contract.resources import LOCK_TARGET_FIELDS, LockTarget
from ringfence.durations import parse_duration

OFFER_TTL = 60.0  # seconds between `web login`'s two requests
LOGIN_TTL = 60.0  # seconds a one-time sign-in URL stays usable
DEFAULT_SESSION_TTL = 8 * 3600.0  # a console session (and its grant) lasts this long
MAX_PENDING = 256  # offers and unused sign-in URLs, each; the oldest go first
MAX_SESSIONS = 1024
MAX_TEXT = 4096  # a form field (lock message, target)
MAX_YAML_BYTES = 16 * 1024 * 1024  # as `create -f`

COOKIE = "ringfence_console"
CSRF_HEADER = "X-CSRF-Token"

# Everything from this origin, no inline script, nothing framed. 'wasm-unsafe-eval' lets
# asciinema-player compile its terminal emulator (WebAssembly), not evaluate script. Inline
# styles are allowed: xterm.js and asciinema-player size and colour the terminal with style
# elements made at run time (styles cannot run script, and pages insert fleet text as text only).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; worker-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the one-time URL never leaves in a Referer
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class ConsoleError(Exception):
    """Refused; `status` is the HTTP status to answer with and str() the message shown."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- sign-in and console sessions --------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    id: str
    seed: str  # the console session's key: stays in this process
    public_key: str
    expires: float


@dataclass(frozen=True)
class ConsoleSession:
    id: str  # the cookie's value
    identity: auth.Identity  # actor = the operator; seed = the session key, not the operator's
    grant: str  # Ringfence-Delegation value
    csrf: str
    expires: float

    @property
    def user(self) -> str:
        return self.identity.user

    def headers(self, subject: str, body: bytes, now: float) -> dict[str, str]:
        """A signed console request as the operator (checked by the services like a CLI request)."""
        return {**auth.sign_request(self.identity, subject, body, now), auth.HEADER_DELEGATION: self.grant}


def _bounded_put(table: OrderedDict, key: str, value: object, limit: int) -> None:
    table[key] = value
    while len(table) > limit:
        table.popitem(last=False)


class Sessions:
    """Offers, one-time sign-in tokens and console sessions, all in memory: a restarted console
    forgets them, and operators sign in again."""

    def __init__(self, session_ttl: float = DEFAULT_SESSION_TTL) -> None:
        self.session_ttl = min(session_ttl, auth.MAX_DELEGATION)
        self.offers: OrderedDict[str, Offer] = OrderedDict()
        self.tokens: OrderedDict[str, tuple[ConsoleSession, float]] = OrderedDict()
        self.sessions: OrderedDict[str, ConsoleSession] = OrderedDict()

    def offer(self, now: float) -> Offer:
        seed = auth.new_user_seed()
        made = Offer(secrets.token_urlsafe(16), seed, auth.public_key_of(seed), now + OFFER_TTL)
        _bounded_put(self.offers, made.id, made, MAX_PENDING)
        return made

    def accept(self, offer_id: str, grant_value: str, signer_key: str, actor: str, now: float) -> str:
        """A one-time sign-in token for the operator whose verified request (`actor`, signed with
        `signer_key`) carries a grant for the offer's key."""
        offer = self.offers.pop(offer_id, None)
        if offer is None or offer.expires <= now:
            raise ConsoleError("this sign-in offer is unknown or expired; run `ringfence web login` again", 404)
        grant, _ = auth.parse_grant(grant_value)
        if grant.actor != actor or grant.operator_nkey != signer_key or grant.session_nkey != offer.public_key:
            raise ConsoleError(f'the grant must be signed by "{actor}" with the key that signed this request, '
                               "for the offered session key", 403)
        # The services check the grant's signature on every request; check it here too, so a
        # bad one fails now rather than on the first page.
        signed = auth.SignedRequest(actor, offer.public_key, int(now * 1000), "", b"")
        auth.check_grant(grant_value, signed, now)
        session = ConsoleSession(secrets.token_urlsafe(32), auth.Identity(actor, offer.seed), grant_value,
                                 secrets.token_urlsafe(32), grant.expires_ms / 1000)
        token = secrets.token_urlsafe(32)
        _bounded_put(self.tokens, token, (session, now + LOGIN_TTL), MAX_PENDING)
        return token

    def redeem(self, token: str, now: float) -> ConsoleSession:
        """The session a sign-in URL opens; each works once."""
        found = self.tokens.pop(token, None)
        if found is None or found[1] <= now:
            raise ConsoleError("this sign-in link was already used or has expired; run `ringfence web login` "
                               "for a new one", 403)
        session = found[0]
        _bounded_put(self.sessions, session.id, session, MAX_SESSIONS)
        return session

    def get(self, cookie: str | None, now: float) -> ConsoleSession:
        session = self.sessions.get(cookie or "")
        if session is None or session.expires <= now:
            self.sessions.pop(cookie or "", None)
            raise ConsoleError("not signed in (or the console session ended): run `ringfence web login` and "
                               "open the URL it prints", 401)
        return session

    def end(self, cookie: str) -> None:
        self.sessions.pop(cookie, None)


def login_url(base: str, token: str) -> str:
    return f"{base.rstrip('/')}/login?token={token}"


def check_write(session: ConsoleSession, csrf: str | None, origin: str | None, host: str | None) -> None:
    """A request that changes something must carry the session's CSRF token, and when the browser
    names an Origin (it always does for writes and WebSockets) it must be this console's."""
    if not csrf or not hmac.compare_digest(csrf, session.csrf):
        raise ConsoleError(f"missing or wrong {CSRF_HEADER}: reload the page", 403)
    check_origin(origin, host)


def check_origin(origin: str | None, host: str | None) -> None:
    if origin is not None and (not host or urlsplit(origin).netloc != host):
        raise ConsoleError(f"request from another origin ({origin[:100]}) refused", 403)


# --- what pages send -> the CLI's requests ---------------------------------------------------------


def _text(body: Mapping[str, object], key: str) -> str:
    value = body.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConsoleError(f"{key}: expected text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ConsoleError(f"{key}: longer than {MAX_TEXT} characters")
    return value.strip()


def lock_target(body: Mapping[str, object]) -> LockTarget:
    unknown = [k for k in body if k not in LOCK_TARGET_FIELDS]
    if unknown:
        raise ConsoleError(f'"{unknown[0][:40]}" is not a lock target; use {", ".join(LOCK_TARGET_FIELDS)}')
    return LockTarget(**{f: _text(body, f) for f in LOCK_TARGET_FIELDS})


def lock_request(body: Mapping[str, object]) -> api.LockRequest:
    """`ringfence lock`: {"target": {...}, "message", "ttl", "expires"}; the locks service checks the rest."""
    target = body.get("target")
    if not isinstance(target, Mapping):
        raise ConsoleError("target: expected an object of lock targets")
    return api.LockRequest(target=lock_target(target), message=_text(body, "message"), ttl=_text(body, "ttl"),
                           expires=_text(body, "expires"))


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time(param: str, text: str) -> str:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None:
        raise ConsoleError(f'{param}: "{text[:60]}" is not a time (e.g. 2021-07-22T22:24:14Z)')
    return _rfc3339(when if when.tzinfo else when.replace(tzinfo=dt.UTC))


def search_request(query: Mapping[str, str], now: dt.datetime) -> api.SearchRequest:
    """`events search` from a page's query string: type (comma list), since, from, to, user, sid,
    limit, order, and page (the next_key of the page before)."""
    since, start = query.get("since", "").strip(), query.get("from", "").strip()
    if since and start:
        raise ConsoleError("use only one of since and from")
    if since:
        try:
            start = _rfc3339(now - dt.timedelta(seconds=parse_duration(since)))
        except ValueError as exc:
            raise ConsoleError(f"since: {exc}") from None
    elif start:
        start = _time("from", start)
    end = query.get("to", "").strip()
    types = [t.strip() for t in query.get("type", "").split(",") if t.strip()]
    for t in types:
        if t not in EVENT_TYPES:
            raise ConsoleError(f'type: "{t[:60]}" is not an event type; known: {", ".join(sorted(EVENT_TYPES))}')
    limit_text = query.get("limit", "").strip() or "100"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= api.MAX_SEARCH_LIMIT:
        raise ConsoleError(f'limit: "{limit_text[:20]}" is not a number from 1 to {api.MAX_SEARCH_LIMIT}')
    order = query.get("order", "") or "desc"
    if order not in ("asc", "desc"):
        raise ConsoleError(f'order: "{order[:20]}": use asc or desc')
    return api.SearchRequest(start=start, end=_time("to", end) if end else "", event_types=types,
                             user=query.get("user", "").strip(), sid=query.get("sid", "").strip(),
                             limit=int(limit_text), order=order, start_key=query.get("page", ""))  # type: ignore[arg-type]


def recording_list_request(query: Mapping[str, str]) -> RecordingListRequest:
    limit_text = query.get("limit", "").strip() or "100"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST_LIMIT:
        raise ConsoleError(f'limit: "{limit_text[:20]}" is not a number from 1 to {MAX_LIST_LIMIT}')
    return RecordingListRequest(user=query.get("user", "").strip(), limit=int(limit_text))


def check_sid(sid: str) -> str:
    if not is_valid_sid(sid):
        raise ConsoleError(f'"{sid[:80]}" is not a session id', 404)
    return sid


def api_status(kind: str) -> int:
    """The HTTP status for a service's error kind."""
    return {"invalid": 400, "not_found": 404, "access_denied": 403, "conflict": 409}.get(kind, 502)
