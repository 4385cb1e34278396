"""Requests that carry resource documents, and how errors about them are worded.

Shared by every service that owns resources (policy, locks), so a request is
bounded, decoded and reported on the same way whichever service answers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import msgspec

from . import api, strict
from .resources import MAX_NAME_LEN

T = TypeVar("T")

MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_PROBLEMS_SHOWN = 50  # more would scroll the first (usually the cause) out of sight
# A request is applied as one atomic write (runtime/kv_batch.py), which holds at most 1000 keys.
MAX_DOCUMENTS = 1000
MAX_QUOTED = MAX_NAME_LEN + 3  # longer names are invalid; messages show their start

show = strict.show  # a value as the user wrote it: quoted when a string, one line, cut when long


def quote(name: str) -> str:
    """Go's %q: "alice". For names we reject: control characters are escaped, and a name
    longer than any valid one is cut (an error reply must fit in a NATS message)."""
    if len(name) > MAX_QUOTED:
        name = name[: MAX_QUOTED - 3] + "..."
    return '"' + strict.visible(name.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def format_problems(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more problems")
    return "\n".join(shown)


def document_label(position: int, doc: Any) -> str:
    """`document 2 (role "x")` from whatever the user wrote, valid or not."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    metadata = doc.get("metadata") if isinstance(doc, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(kind, str):
        return f"document {position}"
    kind = strict.visible(kind if len(kind) <= 60 else kind[:57] + "...")
    if isinstance(name, str):
        return f"document {position} ({kind} {quote(name)})"
    return f"document {position} ({kind})"


def decode_request(data: bytes, type_: type[T]) -> T:
    """A request body of `type_`; ApiError("malformed request: ...") when it is not one."""
    try:
        return msgspec.json.decode(data, type=type_)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a string: UnicodeDecodeError
        raise api.ApiError(f"malformed request: {strict.visible(str(exc))}") from None
    except RecursionError:
        raise api.ApiError(f"malformed request: {strict.NESTED_TOO_DEEPLY}") from None


def strict_request(type_: type[T]) -> Callable[[bytes], T]:
    """A request decoder for add_endpoint(request=...) whose errors name the key and the value
    (strict.decode_json); an empty body is an empty object."""
    def decode(data: bytes) -> T:
        try:
            return strict.decode_json(data or b"{}", type_)
        except strict.DecodeError as exc:
            raise api.ApiError(str(exc)) from None
    return decode


class CreateDocuments(NamedTuple):
    docs: list[Any]  # untyped, as the user wrote them: the owning service checks each strictly
    dry_run: bool


def decode_create_request(data: bytes) -> CreateDocuments:
    """The documents of a create request, bounded in size and count."""
    if len(data) > MAX_REQUEST_BYTES:
        raise api.ApiError(
            f"the request is {len(data)} bytes; at most {MAX_REQUEST_BYTES} ({MAX_REQUEST_BYTES >> 20} MiB) "
            "are accepted: split the documents into several requests"
        )
    try:
        # Typed decoding keeps each document as raw JSON; the service checks it strictly.
        request = msgspec.json.decode(data, type=api.CreateRequest)
        docs = [msgspec.json.decode(raw) for raw in request.resources]
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise api.ApiError(f"malformed create request: {strict.visible(str(exc))}") from None
    except RecursionError:
        raise api.ApiError(f"malformed create request: {strict.NESTED_TOO_DEEPLY}") from None
    if not docs:
        raise api.ApiError("the request contains no documents")
    if len(docs) > MAX_DOCUMENTS:
        raise api.ApiError(f"the request contains {len(docs)} documents; at most {MAX_DOCUMENTS} are applied "
                           "together: split them into several requests")
    return CreateDocuments(docs, request.dry_run)
