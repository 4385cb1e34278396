"""Go-style durations ("15m", "1h30m", "10s", "500ms"), as in the original's YAML."""

from __future__ import annotations

import re

from .contract.strict import show

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
MAX_SECONDS = 100 * 365 * 86400.0


def parse_duration(text: str) -> float:
    """Seconds in `text`; raises ValueError naming the text on bad input."""
    s = text.strip()
    if s in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"{show(text)} is not a duration; use e.g. 90s, 15m, 10h or 1h30m")
    if total > MAX_SECONDS:
        raise ValueError(f"{show(text)} is longer than 100 years")
    return total


def format_duration(seconds: float) -> str:
    """Go's time.Duration.String() for whole seconds and up: 15m0s, 1h2m3s, 45s."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    total = round(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"
