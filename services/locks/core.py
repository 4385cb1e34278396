"""The locks service's decisions, without I/O.

The adapter reads what exists, asks this module what to change, then writes.
Every input is checked before anything is planned, so bad input changes
nothing. Time is an argument (`now`, an aware datetime), never read here.

Locks live in KV under their name (a UUID for `ringfence lock`, or a safe name
from a `create -f` document). A lock is in force while `spec.expires` is unset
or in the future (ringfence.locking decides); `get` lists only locks in force,
and the adapter deletes expired ones as housekeeping.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ringfence import locking
from ringfence.contract import api, events, strict
from ringfence.contract import resources as r
from ringfence.contract.documents import document_label, format_problems, quote, show
from ringfence.durations import parse_duration

MAX_HINTS_SHOWN = 5

NO_TARGET = "at least one target field must be set"
TTL_AND_EXPIRES = "use only one of --expires and --ttl"

# Lock names are KV keys ([-/_=.a-zA-Z0-9], no leading/trailing "."): we also
# leave out "/" so that `rm locks/NAME` is unambiguous, and ".." (an empty
# subject token).
_NAME = re.compile(r"[A-Za-z0-9_=-](?:[-_=.A-Za-z0-9]*[-_=A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in messages

# Why a lock.deleted event happened (its `reason` field).
REASON_DELETED = "deleted"
REASON_UNLOCKED = "unlocked"
REASON_EXPIRED = "expired"

# Expiry events get a uid derived from the lock and its revision, so that two
# locks services expiring the same lock publish one event (the stream drops
# the duplicate message id).
_EXPIRY_NAMESPACE = uuid.UUID("0b8d6a53-2f0e-4e4a-9d3c-6c1f1b7a4e21")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def timestamp(now: dt.datetime) -> str:
    """`created`: UTC with millisecond precision, as audit events carry it."""
    return locking.format_time(now.replace(microsecond=now.microsecond // 1000 * 1000))


# --- checks shared by documents and `ringfence lock` ------------------------------------


def valid_name(name: str) -> bool:
    return len(name) <= r.MAX_NAME_LEN and ".." not in name and bool(_NAME.fullmatch(name))


def check_name(name: str, path: str = "metadata.name") -> list[str]:
    if valid_name(name):
        return []
    return [f"{path}: {show(name)} is not a valid lock name: use a UUID, or 1-{r.MAX_NAME_LEN} letters, digits "
            'and "-_=." (not starting or ending with ".")']


def flag_path(field_name: str) -> str:
    """How `ringfence lock` names a target field: --server-id."""
    return "--" + field_name.replace("_", "-")


def document_path(field_name: str) -> str:
    return f"spec.target.{field_name}"


def check_target(target: r.LockTarget, path_of=document_path, where: str = "") -> list[str]:
    """Problems with a lock target; `where` prefixes the "no target" problem (`spec.target: `)."""
    fields = target.fields()
    if not fields:
        return [f"{where}{NO_TARGET}"]
    problems = []
    for name, value in fields.items():
        if len(value) > r.MAX_NAME_LEN or value != value.strip() or _CONTROL.search(value) or "\t" in value:
            problems.append(f"{path_of(name)}: {show(value)} is not a valid value: use 1-{r.MAX_NAME_LEN} "
                            "characters, no control characters or surrounding spaces")
    return problems


# `ssh-keygen -lf KEY.pub` prints SHA256: and the unpadded base64 of a 32-byte digest.
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
KEY_TARGETS = {
    "device": "the key (or the certificate's key) a session logged in with",
    "mfa_device": "the FIDO security key (sk-ssh-ed25519, sk-ecdsa) a session logged in with",
}


def check_matchable(target: r.LockTarget, path_of=document_path) -> list[str]:
    """Problems with the targets of a new lock that could never match a session here: a target
    kind OpenSSH fleets do not have, or a key target that is not a key fingerprint."""
    problems = []
    for name, value in target.fields().items():
        if name in locking.UNMATCHABLE_TARGETS:
            problems.append(f"{path_of(name)}: {show(value)}: cannot be locked here: "
                            f"{locking.UNMATCHABLE_TARGETS[name]}")
        elif name in KEY_TARGETS and not _FINGERPRINT.fullmatch(value):
            problems.append(f"{path_of(name)}: {show(value)} is not an SSH key fingerprint: {name} locks match "
                            f"the SHA256 fingerprint of {KEY_TARGETS[name]}, as `ssh-keygen -lf KEY.pub` prints "
                            "it (SHA256: and 43 characters)")
    return problems


def check_message(message: str, path: str) -> list[str]:
    if len(message) > r.MAX_MESSAGE_LEN:
        return [f"{path}: {len(message)} characters; at most {r.MAX_MESSAGE_LEN} are allowed"]
    if _CONTROL.search(message):
        return [f"{path}: {show(message)} contains control characters (one line of text is shown to users)"]
    return []


def check_metadata(md: r.Metadata) -> list[str]:
    problems = check_name(md.name)
    if len(md.description) > r.MAX_MESSAGE_LEN:
        problems.append(f"metadata.description: {len(md.description)} characters; at most {r.MAX_MESSAGE_LEN} "
                        "are allowed")
    if len(md.labels) > r.MAX_LIST_ITEMS:
        problems.append(f"metadata.labels: {len(md.labels)} entries; at most {r.MAX_LIST_ITEMS} are allowed")
    return problems


def parse_expires(text: str, path: str) -> tuple[str, list[str]]:
    """The expiry normalised to UTC, or the problem with it."""
    try:
        return locking.format_time(locking.parse_time(text)), []
    except ValueError as exc:
        return "", [f"{path}: {exc}"]


# --- requests ---------------------------------------------------------------------------


def check_kind(text: str) -> None:
    """`get`/`rm` requests name the kind; this service serves locks only."""
    kind = r.KIND_ALIASES.get(text)
    if kind is None:
        raise api.ApiError(f"unknown kind {quote(text)}; the locks service serves kind \"lock\"")
    if kind not in r.LOCK_KINDS:
        raise api.ApiError(f"kind {quote(kind)} is served by the policy service, not the locks service")


# --- create -f --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    label: str  # `document 2 (lock "x")`, how errors and warnings name it
    lock: r.Lock  # checked, expiry normalised, not yet stamped


@dataclass(frozen=True)
class Change:
    key: str
    value: bytes | None  # None deletes the key
    message: str
    event: events.AuditEvent
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # Write only if the key is still at this revision (deletes of a lock we read).
    last: int | None = None


def check_document(doc: Any) -> tuple[list[str], r.Lock | None]:
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if isinstance(kind, str) and kind in r.RESOURCE_TYPES and kind not in r.LOCK_KINDS:
        return [f"kind {quote(kind)} is served by the policy service, not the locks service"], None
    try:
        decoded = strict.convert(doc, r.AnyResource)
    except strict.DecodeError as exc:
        return [str(exc)], None
    assert isinstance(decoded, r.Lock)  # every other kind was turned away above
    spec = decoded.spec
    problems = check_metadata(decoded.metadata)
    problems += check_target(spec.target, document_path, "spec.target: ") or check_matchable(spec.target)
    problems += check_message(spec.message, "spec.message")
    expires = ""
    if spec.expires:
        expires, found = parse_expires(spec.expires, "spec.expires")
        problems += found
    lock = msgspec.structs.replace(decoded, spec=msgspec.structs.replace(spec, expires=expires))
    return problems, lock


def check_documents(docs: list[Any]) -> list[Document]:
    """Decode and check every document; raise one ApiError naming every problem."""
    problems: list[str] = []
    checked: list[Document] = []
    first_of_name: dict[str, int] = {}
    for position, doc in enumerate(docs, 1):
        label = document_label(position, doc)
        found, lock = check_document(doc)
        if lock is not None and not found:
            name = lock.metadata.name
            if name in first_of_name:
                found = [f"the request already contains this lock (document {first_of_name[name]})"]
            first_of_name.setdefault(name, position)
        problems.extend(f"{label}: {p}" for p in found)
        if lock is not None:
            checked.append(Document(label, lock))
    if problems:
        raise api.ApiError(format_problems(problems))
    return checked


def stamped(lock: r.Lock, actor: str, now: dt.datetime) -> r.Lock:
    """The lock as stored: the service, not the request, says who wrote it and when."""
    spec = msgspec.structs.replace(lock.spec, created=timestamp(now), created_by=actor)
    return msgspec.structs.replace(lock, spec=spec)


def created_event(lock: r.Lock, actor: str) -> events.LockCreated:
    spec = lock.spec
    return events.LockCreated(name=lock.metadata.name, target=spec.target.fields(), message=spec.message,
                              expires=spec.expires, user=actor)


def plan_create(docs: list[Document], existing: set[str], actor: str, now: dt.datetime) -> list[Change]:
    """One change per document; `existing` names the locks stored now ("created" or "updated").

    A lock that has already expired is accepted (restoring a saved listing must
    not fail over one stale lock) with a warning; the service removes it."""
    changes = []
    for doc in docs:
        lock = stamped(doc.lock, actor, now)
        name = lock.metadata.name
        verb = "updated" if name in existing else "created"
        warnings: tuple[str, ...] = ()
        if not locking.in_force(lock, now):
            warnings = (f"warning: lock {quote(name)} expired at {lock.spec.expires}; it is not in force "
                        "and will be removed",)
        changes.append(Change(name, r.encode(lock), f"lock {quote(name)} has been {verb}",
                              created_event(lock, actor), warnings))
    return changes


def create_messages(changes: list[Change]) -> list[str]:
    return [line for c in changes for line in (c.message, *c.warnings)]


# --- ringfence lock ------------------------------------------------------------------------------


def lock_expiry(request: api.LockRequest, now: dt.datetime) -> tuple[str, list[str]]:
    """`expires` for a `ringfence lock` request: from --ttl (rounded up to a whole
    second, so the lock lasts at least that long) or --expires (in the future)."""
    if request.ttl and request.expires:
        return "", [TTL_AND_EXPIRES]
    if request.ttl:
        try:
            seconds = parse_duration(request.ttl)
        except ValueError as exc:
            return "", [f"--ttl: {exc}"]
        if seconds <= 0:
            return "", [f"--ttl: {show(request.ttl)} must be longer than zero (leave --ttl out for no expiry)"]
        until = (now + dt.timedelta(seconds=seconds)).replace(microsecond=0)
        if until < now + dt.timedelta(seconds=seconds):
            until += dt.timedelta(seconds=1)
        return locking.format_time(until), []
    if request.expires:
        try:
            until = locking.parse_time(request.expires)
        except ValueError as exc:
            return "", [f"--expires: {exc}"]
        if until <= now:
            return "", [f"--expires: {show(request.expires)} is not in the future (it is now "
                        f"{locking.format_time(now.replace(microsecond=0))})"]
        return locking.format_time(until), []
    return "", []


def plan_lock(request: api.LockRequest, name: str, actor: str, now: dt.datetime) -> Change:
    """The lock `ringfence lock` asks for, named `name` (a fresh UUID)."""
    problems = check_target(request.target, flag_path) or check_matchable(request.target, flag_path)
    problems += check_message(request.message, "--message")
    expires, found = lock_expiry(request, now)
    problems += found
    if problems:
        raise api.ApiError(format_problems(problems))
    lock = r.Lock(metadata=r.Metadata(name=name),
                  spec=r.LockSpec(target=request.target, message=request.message, expires=expires))
    lock = stamped(lock, actor, now)
    return Change(name, r.encode(lock), f"Created a lock with name {quote(name)}.", created_event(lock, actor))


# --- get, rm, unlock ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """A lock as read from KV, with the revision conditional deletes name."""

    lock: r.Lock
    revision: int


def _listing_order(lock: r.Lock) -> tuple[str, str]:
    return (lock.spec.created, lock.metadata.name)


def listing(stored: list[r.Lock], now: dt.datetime) -> list[r.Lock]:
    """`get locks`: the locks in force, oldest first."""
    return sorted((lock for lock in stored if locking.in_force(lock, now)), key=_listing_order)


def not_found(name: str) -> api.ApiError:
    return api.ApiError(f"lock {quote(name)} not found", "not_found")


def get_one(name: str, stored: r.Lock | None, now: dt.datetime) -> list[r.Lock]:
    """`get locks/NAME`: the lock while it is in force."""
    if stored is None:
        raise not_found(name)
    if not locking.in_force(stored, now):
        raise api.ApiError(f"lock {quote(name)} not found (it expired at {stored.spec.expires})", "not_found")
    return [stored]


def deleted_event(name: str, reason: str, actor: str) -> events.LockDeleted:
    return events.LockDeleted(name=name, reason=reason, user=actor)


def plan_delete(name: str, stored: Stored | None, actor: str) -> Change:
    """`rm locks/NAME`; a lock that is not there is an error (the name was probably mistyped)."""
    if not name:
        raise api.ApiError("name the lock to delete: ringfence rm locks/NAME")
    if stored is None:
        raise not_found(name)
    return Change(name, None, f"lock {quote(name)} has been deleted",
                  deleted_event(name, REASON_DELETED, actor), last=stored.revision)


def plan_unlock(target: r.LockTarget, stored: dict[str, Stored], actor: str, now: dt.datetime
                ) -> tuple[list[Change], str]:
    """`ringfence unlock --user alice`: remove every lock in force whose target is exactly this one."""
    problems = check_target(target, flag_path)
    if problems:
        raise api.ApiError(format_problems(problems))
    wanted = target.fields()
    live = {name: s for name, s in sorted(stored.items()) if locking.in_force(s.lock, now)}
    hits = [name for name, s in live.items() if s.lock.spec.target.fields() == wanted]
    described = target.describe()
    if not hits:
        wider = [(name, s.lock) for name, s in live.items()
                 if wanted.items() <= s.lock.spec.target.fields().items()]
        message = f"no lock targets {described}"
        if wider:
            shown = ", ".join(f"lock {quote(n)} ({lock.spec.target.describe()})" for n, lock in wider[:MAX_HINTS_SHOWN])
            more = f" and {len(wider) - MAX_HINTS_SHOWN} more" if len(wider) > MAX_HINTS_SHOWN else ""
            message += (f" exactly; these target it among others: {shown}{more}; "
                        "remove them with ringfence rm locks/NAME")
        raise api.ApiError(message, "not_found")
    changes = [Change(name, None, f"lock {quote(name)} has been deleted",
                      deleted_event(name, REASON_UNLOCKED, actor), last=live[name].revision) for name in hits]
    return changes, f"removed {plural(len(hits), 'lock')} targeting {described}"


# --- expiry --------------------------------------------------------------------------------------------


def expiry_uid(name: str, revision: int) -> str:
    return str(uuid.uuid5(_EXPIRY_NAMESPACE, f"{name}@{revision}"))


def plan_expiry(stored: dict[str, Stored], now: dt.datetime) -> list[Change]:
    """Deletes for the stored locks that are no longer in force at `now`."""
    changes = []
    for name, s in sorted(stored.items()):
        if locking.in_force(s.lock, now):
            continue
        event = deleted_event(name, REASON_EXPIRED, "")
        event.uid = expiry_uid(name, s.revision)
        changes.append(Change(name, None, f"lock {quote(name)} expired at {s.lock.spec.expires}", event,
                              last=s.revision))
    return changes


def seconds_until(when: dt.datetime | None, now: dt.datetime, cap: float) -> float:
    """How long the expiry timer sleeps: until `when`, at most `cap` (clocks jump)."""
    if when is None:
        return cap
    return max(0.0, min(cap, math.ceil((when - now).total_seconds() * 1000) / 1000))
