"""The README's console blocks, run against a real stack: what the README shows is what a user gets.

Every ```console block of README.md is picked up, in order, and run against one `ringfence up`
(temporary data dir, random port, node name of its own; HOME is a temporary directory). A line
starting with `$ ` is a command (a line ending with `\\` continues it), run by bash in the
repository root with `ringfence` on PATH and only RINGFENCE_DATA_DIR set, as an operator on the
stack's node, in a terminal. The lines up to the next command are its expected output (what
the terminal shows); blank lines at its end do not count, and a run of spaces matches any run of
spaces. A read (`ringfence events search|get|sessions ls|sessions play|status`) that differs is
tried again for a few seconds: audit events and recordings are stored a moment after the command
that caused them returned.

Placeholders in expected output (the README shows them as they are):

    <uuid>    a UUID                          <time>  an RFC 3339 time (2026-11-21T05:49:30.394Z)
    <int>     a whole number (pid, ms, ...)   <hex>   hex digits (a short session id)
    <id>      letters and digits              <path>  anything without spaces
    <...>     anything, within the line
    ...       (a line of its own) any number of lines, none included

`<uuid:lock>` (any placeholder kind, then a name) keeps what it matched: later, the same
`<uuid:lock>` must match the same text, and in a command it stands for that text. Any other
`<word>` is literal text.

A block that cannot run here opts out with a comment on the line before it, with the reason:

    <!-- doctest: skip (needs a real ssh login; tests/test_ssh_sessions.py covers it) -->

A skipped block is reported with its reason; a skip without a reason fails the test.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
import warnings
from dataclasses import dataclass, field

import pytest

from ringfence.config import parse_config
from tests.support.procs import ROOT
from tests.support.stack import UpStack

README = ROOT / "README.md"
SKIP = re.compile(r"^<!--\s*doctest:\s*skip\b\s*(.*?)\s*-->$")
COMMAND_TIMEOUT = 60
# A read whose output differs is run again for up to SETTLE seconds: an audit event reaches
# the search index a moment after the command that caused it returned, as it does for a user.
READ_ONLY = re.compile(r"^(\.venv/bin/)?ringfence (events search|get|sessions ls|sessions play|status)\b")
SETTLE = 5.0

PLACEHOLDERS = {
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "time": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)",
    "int": r"\d+",
    "hex": r"[0-9a-f]+",
    "id": r"[A-Za-z0-9]+",
    "path": r"\S+",
    "...": r".*?",
}
PLACEHOLDER = re.compile(r"<(uuid|time|int|hex|id|path|\.\.\.)(?::([A-Za-z_][\w-]*))?>")


@dataclass
class Command:
    line: int  # in README.md
    text: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    line: int
    commands: list[Command]
    skip: str | None = None  # the reason, when the block opts out


def parse_readme(text: str) -> list[Block]:
    """Every ```console block, its commands and their expected output."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        start = i + 1
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]  # a block inside a list item
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.match(before)
        skip = None
        if marker:
            skip = marker.group(1).strip("()— -:")
            if not skip:
                raise AssertionError(f"README.md:{i}: a doctest skip needs its reason: {before}")
        i += 1
        commands: list[Command] = []
        while skip and i < len(lines) and lines[i].strip() != "```":  # not run, so not read
            i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i].removeprefix(indent)
            if line.startswith("$ "):
                cmd = Command(i + 1, line[2:])
                while cmd.text.endswith("\\") and i + 1 < len(lines):  # bash reads the continuation as is
                    i += 1
                    cmd.text += "\n" + lines[i].removeprefix(indent)
                commands.append(cmd)
            elif commands:
                commands[-1].expected.append(line)
            elif line.strip():
                raise AssertionError(f"README.md:{i + 1}: output before the first `$ ` command: {line!r}")
            i += 1
        blocks.append(Block(start, commands, skip))
        i += 1
    return blocks


def _trim(lines: list[str]) -> list[str]:
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def line_pattern(expected: str, bound: dict[str, str]) -> tuple[re.Pattern, list[str]]:
    """The regex for one expected line, and the names it newly binds (in group order)."""
    parts: list[str] = []
    names: list[str] = []
    pos = 0
    for m in PLACEHOLDER.finditer(expected):
        parts.append(_literal(expected[pos : m.start()]))
        kind, name = m.group(1), m.group(2)
        key = f"{kind}:{name}" if name else None
        if key and key in bound:
            parts.append(re.escape(bound[key]))
        elif key and key in names:
            parts.append(f"(?P={_group(key)})")
        elif key:
            names.append(key)
            parts.append(f"(?P<{_group(key)}>{PLACEHOLDERS[kind]})")
        else:
            parts.append(PLACEHOLDERS[kind])
        pos = m.end()
    parts.append(_literal(expected[pos:]))
    return re.compile("".join(parts)), names


def _literal(text: str) -> str:
    return " +".join(re.escape(word) for word in re.split(r" +", text))


def _group(key: str) -> str:
    return re.sub(r"\W", "_", key)


def match(expected: list[str], actual: list[str], bound: dict[str, str]) -> dict[str, str] | None:
    """The bindings (old and new) when `actual` matches `expected`, else None."""
    if not expected:
        return bound if not actual else None
    head, rest = expected[0], expected[1:]
    if head.strip() == "...":
        for skip in range(len(actual) + 1):
            found = match(rest, actual[skip:], bound)
            if found is not None:
                return found
        return None
    if not actual:
        return None
    pattern, names = line_pattern(head, bound)
    m = pattern.fullmatch(actual[0])
    if m is None:
        return None
    return match(rest, actual[1:], {**bound, **{key: m.group(_group(key)) for key in names}})


def substitute(command: str, bound: dict[str, str]) -> str:
    def value(m: re.Match) -> str:
        if not m.group(2):
            return m.group(0)
        key = f"{m.group(1)}:{m.group(2)}"
        if key not in bound:
            raise AssertionError(f"{m.group(0)} is used before any output matched it")
        return bound[key]

    return PLACEHOLDER.sub(value, command)


# --- the matcher itself: fast, no stack ---------------------------------------------------------


@pytest.mark.parametrize(("expected", "actual", "ok"), [
    (['Created a lock with name "<uuid:l>".'], ['Created a lock with name "dc7cee9d-fe5e-4534-a90d-db770f0234a1".'],
     True),
    (['Created a lock with name "<uuid>".'], ['Created a lock with name "not-a-uuid".'], False),
    (["a  b <int>"], ["a b 12"], True),  # spaces are flexible, digits are not
    (["a b <int>"], ["a b x"], False),
    (["...", "last <...>"], ["one", "two", "last line here"], True),
    (["...", "last"], [], False),
    (["first", "..."], ["first"], True),
    (["<uuid:x> <uuid:x>"], ["dc7cee9d-fe5e-4534-a90d-db770f0234a1 dc7cee9d-fe5e-4534-a90d-db770f0234a1"], True),
    (["<uuid:x> <uuid:x>"], ["dc7cee9d-fe5e-4534-a90d-db770f0234a1 00000000-fe5e-4534-a90d-db770f0234a1"], False),
    (["<data_dir>/x"], ["<data_dir>/x"], True),  # not a placeholder: literal
    (["at <time>"], ["at 2026-11-21T05:49:30.394Z"], True),
    (["line"], ["line", "more"], False),
])
def test_matcher(expected, actual, ok):
    assert (match(expected, actual, {}) is not None) == ok


def test_a_bound_name_carries_into_later_commands():
    uid = "dc7cee9d-fe5e-4534-a90d-db770f0234a1"
    bound = match(['lock "<uuid:lock>"'], [f'lock "{uid}"'], {})
    assert substitute("ringfence rm locks/<uuid:lock>", bound) == f"ringfence rm locks/{uid}"
    assert match(['gone "<uuid:lock>"'], ['gone "00000000-0000-4000-8000-000000000000"'], bound) is None


def test_parse_commands_output_and_skips():
    text = "\n".join([
        "```console", "$ one \\", "  --flag", "out 1", "", "$ two", "```",
        "<!-- doctest: skip (needs ssh) -->", "```console", "$ ssh x", "```",
        "- a list item:", "  ```console", "  $ three", "  out 3", "  ```",
    ])
    first, second, third = parse_readme(text)
    assert [(c.text, c.expected) for c in third.commands] == [("three", ["out 3"])]
    assert [(c.text, _trim(c.expected)) for c in first.commands] == [("one \\\n  --flag", ["out 1"]), ("two", [])]
    assert first.skip is None and second.skip == "needs ssh"
    with pytest.raises(AssertionError, match="needs its reason"):
        parse_readme("<!-- doctest: skip -->\n```console\n$ x\n```")


def test_every_example_file_is_used_by_the_readme():
    text = README.read_text()
    examples = sorted(p.relative_to(ROOT) for p in (ROOT / "examples").rglob("*") if p.is_file())
    assert examples
    assert [str(p) for p in examples if str(p) not in text] == []
    config = (ROOT / "examples" / "ringfence.yaml").read_text()
    parse_config(config, "examples/ringfence.yaml")
    assert f"```yaml\n{config}```" in text, "README's configuration example differs from examples/ringfence.yaml"


# --- the README against a stack -------------------------------------------------------------------


def run_command(stack: UpStack, text: str) -> list[str]:
    """Run in a terminal (a pty, 200 columns), as the README's reader does: programs that
    behave differently on a pipe (curl's progress meter) show what the reader sees."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(["bash", "-c", text], cwd=ROOT, env={**stack.env, "TERM": "dumb"},
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + COMMAND_TIMEOUT
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([master], [], [], left)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command and everything it started have closed the terminal
                break
            if not data:
                break
            out += data
        else:
            raise AssertionError(f"{text!r} did not finish within {COMMAND_TIMEOUT}s; output so far:\n"
                                 + out.decode(errors="replace"))
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _trim(out.decode(errors="replace").replace("\r\n", "\n").split("\n"))


@pytest.mark.bpf
def test_readme_console_blocks(tmp_path):
    blocks = parse_readme(README.read_text())
    assert blocks, "README.md has no ```console blocks"
    stack = UpStack(tmp_path)
    failures: list[str] = []
    skipped: list[str] = []
    bound: dict[str, str] = {}
    try:
        stack.start()
        for block in blocks:
            if block.skip:
                skipped.append(f"README.md:{block.line}: {block.skip}")
                continue
            for cmd in block.commands:
                try:
                    text = substitute(cmd.text, bound)
                except AssertionError as exc:
                    failures.append(f"README.md:{cmd.line}: $ {cmd.text}\n  {exc}")
                    continue
                actual = run_command(stack, text)
                found = match(_trim(cmd.expected), actual, bound)
                deadline = time.monotonic() + SETTLE
                while found is None and READ_ONLY.match(text) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    actual = run_command(stack, text)
                    found = match(_trim(cmd.expected), actual, bound)
                if found is None:
                    failures.append(f"README.md:{cmd.line}: $ {cmd.text}\n--- expected\n"
                                    + "\n".join(_trim(cmd.expected)) + "\n--- got\n" + "\n".join(actual))
                else:
                    bound = found
    finally:
        stack.stop()
        stack.cleanup()
    assert not failures, f"{len(failures)} README command(s) differ:\n\n" + "\n\n".join(failures)
    for line in skipped:  # in pytest's warnings summary: what the README shows unchecked, and why
        warnings.warn(f"README block not run: {line}", stacklevel=1)
