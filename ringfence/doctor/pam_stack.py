"""sshd's PAM stack, includes followed as PAM does, and Ringfence's line judged in it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .findings import HOLE, OK, OLD_PAM_HOOK_COMMAND, PAM_HOOK_COMMAND, WARN, Finding, Install

PAM_HOOK_CONTROLS = ("required", "requisite")  # a refusal fails the login
# Session modules that move the process into a cgroup of their own.
CGROUP_MOVERS = ("pam_systemd.so", "pam_cgfs.so", "pam_cgroup.so")
MAX_PAM_DEPTH = 16


@dataclass(frozen=True)
class PamLine:
    kind: str  # auth, account, session, password
    control: str  # required, sufficient, [success=1 default=ignore], ...
    module: str  # as written: pam_exec.so or a path
    args: tuple[str, ...]
    origin: str  # file:line
    substack: tuple[str, ...] = ()  # the substacks it is in: their `done` and jumps stay inside

    @property
    def file(self) -> str:
        return self.origin.rsplit(":", 1)[0]

    @property
    def module_name(self) -> str:
        return self.module.rsplit("/", 1)[-1]

    def text(self) -> str:
        return " ".join((self.kind, self.control, self.module, *self.args))


def _pam_tokens(line: str) -> list[str]:
    """Words of a PAM line; `[...]` (a control or an argument) is one word, `\\]` inside it a `]`."""
    tokens, i = [], 0
    while i < len(line):
        if line[i].isspace():
            i += 1
        elif line[i] == "[":
            j, word = i + 1, ""
            while j < len(line) and line[j] != "]":
                if line[j] == "\\" and line[j + 1:j + 2] == "]":
                    j += 1
                word += line[j]
                j += 1
            tokens.append(f"[{word}]")
            i = j + 1
        else:
            j = i
            while j < len(line) and not line[j].isspace():
                j += 1
            tokens.append(line[i:j])
            i = j
    return tokens


def _pam_records(text: str) -> list[tuple[int, list[str]]]:
    """(line number, words) of each line; comments dropped, backslash continuations joined."""
    records, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        line = raw.split("#", 1)[0]
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = _pam_tokens(pending + line)
        pending = ""
        if words:
            records.append((start, words))
    return records


def pam_includes(text: str) -> list[str]:
    """The names of the files a PAM file includes (@include, include, substack)."""
    names = []
    for _, words in _pam_records(text):
        if words[0] == "@include" and len(words) > 1:
            names.append(words[1])
        elif len(words) > 2 and words[1] in ("include", "substack"):
            names.append(words[2])
    return names



def flatten_pam(name: str, files: Mapping[str, str | None]) -> tuple[list[PamLine], list[str]]:
    """The stack PAM builds from file `name` (includes followed), and the problems met (missing files)."""
    problems: list[str] = []

    def walk(file: str, kinds: tuple[str, ...] | None, substack: tuple[str, ...], depth: int) -> list[PamLine]:
        text = files.get(file)
        if text is None:
            problems.append(f"{file}: not found")
            return []
        if depth > MAX_PAM_DEPTH:
            problems.append(f"{file}: included more than {MAX_PAM_DEPTH} deep")
            return []
        out: list[PamLine] = []
        for number, words in _pam_records(text):
            if words[0] == "@include":
                if len(words) > 1:
                    out += walk(words[1], kinds, substack, depth + 1)
                continue
            if len(words) < 3:
                problems.append(f"{file}:{number}: not a PAM line: {' '.join(words)}")
                continue
            kind = words[0].lstrip("-").lower()
            if kinds is not None and kind not in kinds:
                continue
            if words[1] == "include":
                out += walk(words[2], (kind,), substack, depth + 1)
            elif words[1] == "substack":
                out += walk(words[2], (kind,), (*substack, f"{file}:{number}"), depth + 1)
            else:
                out.append(PamLine(kind, words[1], words[2], tuple(words[3:]), f"{file}:{number}", substack))
        return out

    return walk(name, None, (), 0), problems


def exec_command(line: PamLine) -> str | None:
    """The command line of a pam_exec line (its words after pam_exec's own options)."""
    if line.module_name != "pam_exec.so":
        return None
    for i, arg in enumerate(line.args):
        if arg.startswith("/"):
            return " ".join(line.args[i:])
    return ""


def is_ringfence_line(line: PamLine) -> bool:
    command = exec_command(line) or ""
    return "ringfence/hooks/pam_hook.py" in command or bool(OLD_PAM_HOOK_COMMAND.search(command))


def _control_actions(control: str) -> dict[str, str]:
    """value -> action of a control; the simple keywords in their bracket form."""
    simple = {"sufficient": "[success=done new_authtok_reqd=done default=ignore]"}
    control = simple.get(control, control)
    if not control.startswith("["):
        return {}
    return dict(item.split("=", 1) for item in control[1:-1].split() if "=" in item)


def _jump_end(stack: Sequence[PamLine], index: int, count: int) -> int:
    """The index after the modules a jump of `count` from `index` skips: a jump stays in its substack, and
    a substack counts as one module in the stack that holds it (pam.conf(5))."""
    level = stack[index].substack
    depth, j = len(level), index + 1
    while count > 0 and j < len(stack) and stack[j].substack[:depth] == level:
        unit = stack[j].substack[:depth + 1]  # this module, or the substack it starts
        j += 1
        while len(unit) > depth and j < len(stack) and stack[j].substack[:depth + 1] == unit:
            j += 1
        count -= 1
    return j


def _skips(stack: Sequence[PamLine], index: int, target: int) -> str | None:
    """How the line at `index` can make PAM skip the line at `target`, or None."""
    line = stack[index]
    if line.substack != stack[target].substack[:len(line.substack)]:
        return None  # a substack's done and jumps end at the substack
    for value, action in _control_actions(line.control).items():
        if action == "done":
            return f"when it returns {value}, PAM stops the stack there"
        if action.isdigit() and _jump_end(stack, index, int(action)) > target:
            return f"when it returns {value}, PAM jumps over the next {action} module(s)"
    return None


def pam_findings(lines: Sequence[PamLine], problems: Sequence[str], install: Install) -> list[Finding]:
    findings = [Finding(WARN, "pam", "file", problem, "PAM refuses every login when a file it includes is "
                        "missing or unreadable", "restore the file or remove the include", install.pam_file)
                for problem in problems]
    session = [line for line in lines if line.kind == "session"]
    ours_at = [i for i, line in enumerate(session) if is_ringfence_line(line)]
    if not ours_at:
        elsewhere = [line for line in lines if is_ringfence_line(line)]
        value = ", ".join(f"{line.kind} line at {line.origin}" for line in elsewhere) or "missing"
        findings.append(Finding(HOLE, "pam", "ringfence line", value,
                                "sshd never asks the enforcer to place the connection in a session: logins are "
                                "not restricted, locks and connection limits are not checked at login, and port "
                                "forwarding (-L, -D) is not restricted",
                                f"add `{install.pam_line}` right after `@include common-session` (after pam_systemd, "
                                f"before any pam_env) in {install.pam_file}"))
        ours_index = len(session)  # where it goes: the checks below judge the stack against it
    else:
        ours_index = ours_at[0]
        findings.extend(_our_line(session[ours_index], install))
        findings.extend(_before_ours(session, ours_index))
        findings.extend(_after_ours(session, ours_index))
    findings.extend(_user_env(lines, session, ours_index))
    return findings


def _our_line(line: PamLine, install: Install) -> list[Finding]:
    command = exec_command(line) or ""
    text, where = line.text(), line.origin
    found = []
    if PAM_HOOK_COMMAND.match(command):
        found.append(Finding(OK, "pam", "ringfence line", text, where=where))
    elif OLD_PAM_HOOK_COMMAND.search(command):
        found.append(Finding(WARN, "pam", "ringfence line", text,
                             "the older form runs the whole ringfence CLI as root with the PAM environment, which "
                             "then decides what Python loads (PYTHONPATH) and where the enforcer is (RINGFENCE_*); "
                             "the hook script runs isolated from it", f"replace it with `{install.pam_line}`",
                             install.pam_file, where))
    else:
        found.append(Finding(HOLE, "pam", "ringfence line", text,
                             "the hook runs without `python3 -I -S`: Python takes PYTHONPATH, PYTHONHOME and the "
                             "user site from the PAM environment while running as root",
                             f"replace it with `{install.pam_line}`", install.pam_file, where))
    if line.control not in PAM_HOOK_CONTROLS:
        found.append(Finding(HOLE, "pam", "ringfence line control", line.control,
                             "a refusal by the hook (a lock, a connection limit, the enforcer not running) does "
                             "not fail the login: the login goes on outside any session",
                             "session required pam_exec.so ...", install.pam_file, where))
    options = line.args[: len(line.args) - len(command.split())]
    if "stdout" not in options:
        found.append(Finding(WARN, "pam", "pam_exec options", " ".join(options) or "(none)",
                             "without pam_exec's `stdout` option the user is not told why a login was refused "
                             "(the lock message)", "pam_exec.so quiet stdout ...", install.pam_file, where))
    return found


def _before_ours(session: Sequence[PamLine], ours: int) -> list[Finding]:
    found = []
    for i, line in enumerate(session[:ours]):
        how = _skips(session, i, ours)
        if how:
            found.append(Finding(HOLE, "pam", "session line before ringfence's", line.text(),
                                 f"{how}, so Ringfence's line does not run and the login goes on outside any "
                                 "session", "move Ringfence's line before it, or make it not skip (no "
                                 "`sufficient`, `done` or jumps past Ringfence's line)", line.file,
                                 line.origin))
    return found


def _after_ours(session: Sequence[PamLine], ours: int) -> list[Finding]:
    return [Finding(HOLE, "pam", "session line after ringfence's", line.text(),
                    f"{line.module_name} runs after Ringfence's line and moves sshd into a cgroup of its own, out "
                    "of the Ringfence session: the login is not restricted",
                    "move Ringfence's line after it (the last session line)", session[ours].file,
                    line.origin)
            for line in session[ours + 1:] if line.module_name in CGROUP_MOVERS]


def _reads_user_env(line: PamLine) -> bool:
    return line.module_name == "pam_env.so" and "user_readenv=1" in line.args


def _user_env(lines: Iterable[PamLine], session: Sequence[PamLine], ours: int) -> list[Finding]:
    """pam_env user_readenv=1 where it reaches Ringfence's hook: anywhere in auth (its setcred runs before
    the session stack, with key logins too), or before the hook in the session stack."""
    reaching = [line for line in lines if line.kind == "auth" and _reads_user_env(line)]
    reaching += [line for line in session[:ours] if _reads_user_env(line)]
    return [Finding(HOLE, "pam", f"{line.kind} pam_env.so", " ".join(line.args), "pam_env reads the user's "
                    "~/.pam_environment into the PAM environment, which pam_exec hands to Ringfence's hook running "
                    "as root: LD_PRELOAD runs the user's code as root, and other entries (PYTHONPATH, "
                    "SSH_AUTH_INFO_0, RINGFENCE_*) reach the hook", "remove user_readenv=1 from that line",
                    line.file, line.origin)
            for line in reaching]
