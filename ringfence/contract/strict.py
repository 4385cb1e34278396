"""Strict decoding with errors that name the offending key and value.

msgspec reports `Expected int, got str - at $.spec.options.max_sessions`; users
also need the value they wrote, so we look it up in the untyped document.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[\"([^\"]+)\"\]")

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
NESTED_TOO_DEEPLY = "the document is nested too deeply (or refers to itself)"


class DecodeError(ValueError):
    """A document does not fit its schema; str() names the key and the value."""


def _steps(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for m in _STEP.finditer(path):
        if m.group(2) is not None:
            steps.append(int(m.group(2)))
        else:
            steps.append(m.group(1) or m.group(3))
    return steps


def _lookup(doc: Any, steps: list[str | int]) -> tuple[bool, Any]:
    cur = doc
    for step in steps:
        try:
            cur = cur[step]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, cur


def format_path(steps: list[str | int]) -> str:
    out = ""
    for step in steps:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out or "(document)"


def explain(exc: msgspec.ValidationError, doc: Any) -> str:
    """Turn a msgspec validation error on `doc` into `key: value: problem`."""
    text = str(exc)
    m = _PATH.search(text)
    steps = _steps(m.group("path")) if m else []
    problem = _PATH.sub("", text)
    unknown = _UNKNOWN.match(problem)
    if unknown:
        key = format_path([*steps, unknown.group("field")])
        return visible(f"{key}: unknown field")
    found, value = _lookup(doc, steps)
    where = format_path(steps)
    if found:
        return visible(f"{where}: {show(value)}: {problem[0].lower()}{problem[1:]}")
    return visible(f"{where}: {problem[0].lower()}{problem[1:]}")


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str) -> str:
    """`text` with control and other unprintable characters escaped (\\n, \\x00, \\u2028),
    so a value quoted in an error message stays on one line and shows what was sent."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _ESCAPES.get(ch) or _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def show(value: Any) -> str:
    """A value for an error message: quoted when a string, on one line, cut when long."""
    text = repr(value) if not isinstance(value, str) else f'"{visible(value)}"'
    return text if len(text) <= 80 else text[:77] + "..."


def convert(doc: Any, type_: type[T]) -> T:
    """Convert an untyped document (from YAML or JSON) to `type_`, strictly."""
    try:
        return msgspec.convert(doc, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise DecodeError(explain(exc, doc)) from None
    except RecursionError:  # deeply nested, or (from YAML aliases) containing itself
        raise DecodeError(NESTED_TOO_DEEPLY) from None


def decode_json(data: bytes, type_: type[T]) -> T:
    """Decode JSON bytes to `type_`; errors name the key and value."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DecodeError(f"document is {len(data)} bytes; the limit is {MAX_DOCUMENT_BYTES}")
    try:
        doc = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a string: UnicodeDecodeError
        raise DecodeError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError(NESTED_TOO_DEEPLY) from None
    return convert(doc, type_)
