"""sshd_config Match blocks: a connection each applies to (for `sshd -T -C`), and what it adds."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .findings import OK, Finding


def config_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, keyword in lower case, arguments) of each directive of an sshd_config."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"([A-Za-z]+)\s*(?:=\s*|\s+)(.*)$", stripped)
        if match:
            lines.append((number, match.group(1).lower(), match.group(2).strip()))
    return lines


def config_includes(text: str) -> list[str]:
    """The patterns of every Include line (relative ones are relative to /etc/ssh, as for sshd)."""
    return [p for _, keyword, args in config_lines(text) if keyword == "include" for p in shlex.split(args)]


@dataclass(frozen=True)
class MatchBlock:
    criteria: tuple[tuple[str, str], ...]  # (criterion in lower case, pattern list)
    text: str  # the Match line as written
    origin: str  # file:line


def match_blocks(text: str, path: str) -> list[MatchBlock]:
    blocks = []
    for number, keyword, args in config_lines(text):
        if keyword == "match":
            words = shlex.split(args)
            pairs = zip(words[::2], [*words[1::2], ""], strict=False)
            criteria = () if [w.lower() for w in words[:1]] == ["all"] else tuple((k.lower(), v) for k, v in pairs)
            blocks.append(MatchBlock(criteria, f"Match {args}", f"{path}:{number}"))
    return blocks


def _split_patterns(patterns: str) -> tuple[list[str], list[str]]:
    items = [p for p in patterns.split(",") if p]
    return [p for p in items if not p.startswith("!")], [p[1:] for p in items if p.startswith("!")]


def _matches(name: str, patterns: str) -> bool:
    positive, negative = _split_patterns(patterns)
    return (any(fnmatch.fnmatchcase(name, p) for p in positive)
            and not any(fnmatch.fnmatchcase(name, p) for p in negative))


def _instance(patterns: str, fill: str = "x") -> str | None:
    """A name that the pattern list matches (wildcards filled in), or None."""
    positive, _ = _split_patterns(patterns)
    for pattern in positive:
        name = pattern.replace("*", fill).replace("?", fill)
        if _matches(name, patterns):
            return name
    return None


def _address(patterns: str) -> str | None:
    positive, _ = _split_patterns(patterns)
    for pattern in positive:
        try:
            return str(ipaddress.ip_network(pattern, strict=False).network_address)
        except ValueError:
            octets = [("1" if "*" in o or "?" in o else o) for o in pattern.split(".")]
            candidate = ".".join((octets + ["1"] * 4)[:4])
            try:
                return str(ipaddress.ip_address(candidate))
            except ValueError:
                continue
    return None


PROBE_USER, PROBE_HOST, PROBE_ADDR = "ringfence-doctor", "doctor.invalid", "192.0.2.1"


def probe_spec(block: MatchBlock, group_members: Mapping[str, Sequence[str]]) -> str | None:
    """An `sshd -T -C` connection spec that the Match block applies to, or None when none can be made
    (a group without members, a pattern list that only negates)."""
    spec = {"user": PROBE_USER, "host": PROBE_HOST, "addr": PROBE_ADDR}
    criteria = dict(block.criteria)
    if not criteria:
        return None  # Match all: `sshd -T` applies it already
    if "group" in criteria:
        members = [m for group, users in group_members.items() if _matches(group, criteria["group"])
                   for m in users]
        if "user" in criteria:
            members = [m for m in members if _matches(m, criteria["user"])]
        if not members:
            return None
        spec["user"] = sorted(members)[0]
    elif "user" in criteria:
        user = _instance(criteria["user"])
        if user is None:
            return None
        spec["user"] = user
    for criterion, key, pick in (("host", "host", _instance), ("address", "addr", _address),
                                 ("localaddress", "laddr", _address), ("localport", "lport", _instance),
                                 ("rdomain", "rdomain", _instance)):
        if criterion in criteria:
            value = pick(criteria[criterion]) if pick is _address else pick(criteria[criterion], "1")
            if value is None:
                return None
            spec[key] = value
    return ",".join(f"{k}={v}" for k, v in spec.items())


def match_findings(base: Sequence[Finding], probed: Sequence[Finding], block: MatchBlock, spec: str) -> list[Finding]:
    """Holes and warnings a Match block adds to the global configuration (found with `sshd -T -C spec`)."""
    seen = {(f.setting, f.value) for f in base if f.status != OK}
    where = f"{block.text} at {block.origin}, probed with -C {spec}"
    return [Finding(f.status, f.source, f.setting, f.value, f.why, f.fix, "that Match block", where)
            for f in probed if f.status != OK and (f.setting, f.value) not in seen]
