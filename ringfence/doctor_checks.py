"""`ringfence doctor`: which sshd and PAM settings open a hole in Ringfence's controls.

Pure: reads the text of `sshd -T`, sshd_config files and PAM files, returns
findings (setting, value seen, why it matters, the fix). Running sshd and
reading files is ringfence/cli/doctor.py's job.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import shlex
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

HOLE, WARN, OK = "HOLE", "WARN", "ok"

# The sshd ForceCommand Ringfence expects: the isolated wrapper script
# (`.../python3 -I -S .../ringfence/hooks/ssh_session.py`) or the CLI's `ringfence ssh-session`.
FORCE_COMMAND = re.compile(
    r"\S*ringfence/hooks/ssh_session\.py(\s+--socket\s+\S+)?$"
    r"|^\S*\bringfence\s+ssh-session(\s|$)"
)
# Ringfence's PAM session line runs this command (after pam_exec's options): the hook
# script, isolated from the PAM environment (-I: no PYTHON* variables, no user site; -S: no site).
PAM_HOOK_COMMAND = re.compile(
    r"^/\S*/python(3(\.\d+)?)? -I -S /\S*/ringfence/hooks/pam_hook\.py( --socket /\S+)?$"
)
# The older form: the whole CLI, run as root with the PAM environment.
OLD_PAM_HOOK_COMMAND = re.compile(r"^/\S*\bringfence\s+pam-hook(\s|$)")
PAM_HOOK_CONTROLS = ("required", "requisite")  # a refusal fails the login
# Session modules that move the process into a cgroup of their own.
CGROUP_MOVERS = ("pam_systemd.so", "pam_cgfs.so", "pam_cgroup.so")
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/ringfence.conf"


@dataclass(frozen=True)
class Finding:
    status: str  # HOLE, WARN or ok
    source: str  # sshd, pam, files
    setting: str
    value: str
    why: str = ""
    fix: str = ""
    fix_in: str = ""  # the file (or Match block) the fix goes into
    where: str = ""  # a Match block or file:line the value comes from

    def line(self) -> str:
        text = f"{self.status:<5} {self.source} {self.setting} {self.value}".rstrip()
        if self.where:
            text += f" ({self.where})"
        if self.why:
            text += f": {self.why}"
        if self.fix:
            text += f". Fix: {self.fix}" + (f" in {self.fix_in}" if self.fix_in else "")
        return text


@dataclass(frozen=True)
class Install:
    """Where this Ringfence is installed: the fixes name real paths."""

    python: str = "/usr/bin/python3"
    package: str = "/usr/lib/python3/dist-packages/ringfence"
    sshd_fix_in: str = SSHD_DROP_IN
    pam_file: str = "/etc/pam.d/sshd"
    force_command: re.Pattern = FORCE_COMMAND

    @property
    def force_command_line(self) -> str:
        return f"{self.python} -I -S {self.package}/hooks/ssh_session.py"

    @property
    def pam_line(self) -> str:
        return f"session required pam_exec.so quiet stdout {self.python} -I -S {self.package}/hooks/pam_hook.py"


# ---------------------------------------------------------------- sshd -T


def parse_sshd_t(text: str) -> dict[str, list[str]]:
    """`sshd -T` output: keyword (lower case) -> the value of each of its lines."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        keyword, _, value = raw.strip().partition(" ")
        if keyword:
            settings.setdefault(keyword.lower(), []).append(value.strip())
    return settings


@dataclass(frozen=True)
class Rule:
    """A yes/no-style sshd setting: any value outside `ok` (and `warn`) is a hole."""

    name: str
    ok: tuple[str, ...]
    fix: str
    why: str | Mapping[str, str]  # one reason, or a reason per value seen
    warn: tuple[str, ...] = ()
    forwarding: bool = False  # DisableForwarding yes turns it off whatever its value


_STREAMLOCAL_L = ("a client can open any Unix socket on this host through sshd (ssh -L PORT:/path.sock), the "
                  "enforcer's among them, and make requests as sshd's child")
_STREAMLOCAL_R = ("a client can make sshd listen on a Unix socket on this host (ssh -R /path.sock:...) that carries "
                  "connections to the client's side, outside the egress restrictions")

RULES = (
    Rule("UsePAM", ("yes",), "UsePAM yes",
         "sshd skips PAM, so Ringfence's PAM hook never runs: the connection is placed in no session, locks and "
         "connection limits are not checked at login, and port forwarding (-L, -D) is not restricted"),
    Rule("ExposeAuthInfo", ("yes",), "ExposeAuthInfo yes",
         "the PAM hook cannot see the key or certificate the client used, so every login is known by its login "
         "name only: registered keys and certificate identities are not used, and a lock on a person (--user) "
         "does not stop their logins"),
    Rule("AllowStreamLocalForwarding", ("no",), "AllowStreamLocalForwarding no",
         {"local": _STREAMLOCAL_L, "remote": _STREAMLOCAL_R, "yes": f"{_STREAMLOCAL_L}; and {_STREAMLOCAL_R}",
          "all": f"{_STREAMLOCAL_L}; and {_STREAMLOCAL_R}"}, forwarding=True),
    Rule("X11Forwarding", ("no",), "X11Forwarding no",
         "sshd listens for X11 clients on this host and carries their connections to the ssh client: a way out "
         "of the host that the egress restrictions do not see", forwarding=True),
    Rule("AllowAgentForwarding", ("no",), "AllowAgentForwarding no",
         "sshd makes a socket on this host that reaches the client's ssh-agent: processes of the session (and "
         "anyone who can open the socket) can use the user's keys to log in elsewhere", forwarding=True),
    Rule("PermitTunnel", ("no",), "PermitTunnel no",
         "ssh -w joins a tun device on this host to the client: packets through it belong to no socket of a "
         "session, so the egress restrictions do not judge them"),
    Rule("PermitUserRC", ("no",), "PermitUserRC no",
         "~/.ssh/rc runs at every login before the ForceCommand wrapper, outside any channel session: not "
         "recorded as a session and outside the session limits"),
    Rule("PermitUserEnvironment", ("no",), "PermitUserEnvironment no",
         "~/.ssh/environment and environment= options in authorized_keys set variables (LD_PRELOAD, BASH_ENV, "
         "PYTHONPATH) for everything sshd starts for the user, the wrapper included, before it opens the session"),
    Rule("PermitRootLogin", ("no",), "PermitRootLogin no",
         {"yes": "root logs in over ssh, with a password too; a root session can move itself out of its cgroup "
                 "and stop the enforcer, so no Ringfence control holds for it",
          "": "root logs in over ssh (with a key); a root session can move itself out of its cgroup and stop "
              "the enforcer, so no Ringfence control holds for it"},
         warn=("prohibit-password", "without-password", "forced-commands-only")),
)


def first(settings: Mapping[str, list[str]], keyword: str, default: str = "") -> str:
    values = settings.get(keyword.lower())
    return values[0] if values else default


def _rule_finding(rule: Rule, value: str, forwarding_off: bool, install: Install) -> Finding:
    if value in rule.ok:
        return Finding(OK, "sshd", rule.name, value)
    if rule.forwarding and forwarding_off:
        return Finding(OK, "sshd", rule.name, f"{value} (DisableForwarding yes turns it off)")
    why = rule.why if isinstance(rule.why, str) else rule.why.get(value, rule.why.get("", ""))
    status = WARN if value in rule.warn else HOLE
    return Finding(status, "sshd", rule.name, value, why, rule.fix, install.sshd_fix_in)


def _force_command(settings: Mapping[str, list[str]], install: Install) -> Finding:
    command = first(settings, "forcecommand", "none")
    if command != "none" and install.force_command.search(command):
        return Finding(OK, "sshd", "ForceCommand", command)
    program = command.split(None, 1)[0]
    if command == "none":
        what = "shells, commands and subsystems run without Ringfence's wrapper"
    elif program == "internal-sftp":
        what = "sftp runs inside sshd instead of through Ringfence's wrapper"
    else:
        what = f"{program} runs instead of Ringfence's wrapper"
    subsystems = ", ".join(v.split(None, 1)[0] for v in settings.get("subsystem", []))
    if subsystems and program != "internal-sftp":
        what += f" (subsystems too: {subsystems})"
    why = f"{what}: no channel session, so nothing is recorded and the session limits do not apply"
    return Finding(HOLE, "sshd", "ForceCommand", command, why, f"ForceCommand {install.force_command_line}",
                   install.sshd_fix_in)


def _remote_forwarding(settings: Mapping[str, list[str]], forwarding_off: bool, install: Install) -> Finding:
    tcp = first(settings, "allowtcpforwarding", "yes")
    listen = " ".join(settings.get("permitlisten", ["any"]))
    value = f"{tcp}, PermitListen {listen}"
    if tcp in ("no", "local") or listen == "none" or forwarding_off:
        return Finding(OK, "sshd", "AllowTcpForwarding", value)
    return Finding(
        HOLE, "sshd", "AllowTcpForwarding", value,
        "ssh -R makes sshd listen on this host and carry the connections to the client's side: a session "
        "reaches the client's network through it, outside the egress restrictions (which see only a "
        "connection to this host)",
        "AllowTcpForwarding local (keeps -L and -D, which Ringfence restricts) and PermitListen none",
        install.sshd_fix_in)


def _subsystems(settings: Mapping[str, list[str]], force_ok: bool) -> list[Finding]:
    """With the wrapper as ForceCommand, sshd runs it for subsystem requests too (the subsystem's command
    line in SSH_ORIGINAL_COMMAND), internal-sftp included: nothing runs outside it. Without it, the
    ForceCommand finding names them."""
    if not force_ok:
        return []
    return [Finding(OK, "sshd", "Subsystem", value + " (sshd runs the ForceCommand wrapper for it, with "
                    "SSH_ORIGINAL_COMMAND set to this command line)")
            for value in settings.get("subsystem", [])]


def sshd_findings(settings: Mapping[str, list[str]], install: Install) -> list[Finding]:
    """Every check of one effective sshd configuration (`sshd -T`, with or without -C)."""
    forwarding_off = first(settings, "disableforwarding", "no") == "yes"
    findings = [_rule_finding(rule, first(settings, rule.name, "no"), forwarding_off, install) for rule in RULES]
    if forwarding_off:
        findings.append(Finding(OK, "sshd", "DisableForwarding", "yes (no X11, agent, TCP or Unix-socket "
                                "forwarding: -L and -D are off too)"))
    findings.append(_remote_forwarding(settings, forwarding_off, install))
    force = _force_command(settings, install)
    findings.append(force)
    findings.extend(_subsystems(settings, force.status == OK))
    return findings


# ----------------------------------------------------- certificate authorities


@dataclass(frozen=True)
class CaFile:
    """A file of CA public keys as read: `keys` is None when it could not be read (`error` says why)."""

    path: str  # "" when the setting is not set
    keys: frozenset[tuple[str, str]] | None = None
    error: str = ""


def parse_public_keys(text: str) -> frozenset[tuple[str, str]]:
    """(type, base64 blob) of every key line of a TrustedUserCAKeys-style file."""
    keys = set()
    for raw in text.splitlines():
        parts = raw.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            keys.add((parts[0], parts[1]))
    return frozenset(keys)


def ca_findings(sshd: CaFile, ours: CaFile, config_file: str, install: Install) -> list[Finding]:
    """sshd's TrustedUserCAKeys against Ringfence's ssh_service.trusted_user_ca_keys.

    A cert-authority line in a user's own authorized_keys lets that user mint certificates with any key ID,
    so Ringfence takes a certificate's key ID as the identity only from the CAs in its own file."""
    setting = "TrustedUserCAKeys"
    value = f"{sshd.path or 'none'}, ssh_service.trusted_user_ca_keys {ours.path or '(not set)'}"
    fix_ours = f"ssh_service.trusted_user_ca_keys: {sshd.path}"
    for ca in (sshd, ours):
        if ca.path and ca.keys is None:
            return [Finding(HOLE, "sshd", setting, value, f"cannot read {ca.path}: {ca.error}",
                            "make it a readable file of CA public keys, one per line")]
    if not sshd.path and not ours.path:
        return [Finding(WARN, "sshd", setting, value,
                        "no certificate authority is trusted: certificates reach sshd only through cert-authority "
                        "lines users write in their own authorized_keys, so Ringfence never takes a "
                        "certificate's key ID as the identity (logins are known by registered key or login name)",
                        f"if your users log in with certificates, TrustedUserCAKeys FILE in {install.sshd_fix_in} "
                        "and ssh_service.trusted_user_ca_keys: FILE", config_file)]
    if sshd.path and not ours.path:
        return [Finding(HOLE, "sshd", setting, value,
                        "sshd accepts certificates from these CAs but Ringfence trusts none, so certificate "
                        "logins are known by their registered key or login name: a lock on the certificate's "
                        "identity (--user) does not stop them", fix_ours, config_file)]
    missing = (sshd.keys or frozenset()) - (ours.keys or frozenset())
    if missing:
        return [Finding(HOLE, "sshd", setting, value,
                        f"{len(missing)} CA key(s) sshd trusts are not in Ringfence's file, so certificates they "
                        "sign are known by registered key or login name: a lock on the certificate's identity "
                        "(--user) does not stop them", fix_ours, config_file)]
    extra = (ours.keys or frozenset()) - (sshd.keys or frozenset())
    if extra:
        return [Finding(WARN, "sshd", setting, value,
                        f"Ringfence trusts {len(extra)} CA key(s) sshd does not: certificates they sign reach "
                        "sshd only through cert-authority lines in a user's own authorized_keys",
                        f"the same file for both (TrustedUserCAKeys {ours.path})", install.sshd_fix_in)]
    return [Finding(OK, "sshd", setting, value)]


# ------------------------------------------------------- sshd_config Match blocks


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


# -------------------------------------------------------------------- PAM


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


MAX_PAM_DEPTH = 16


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


def _pam_exec_command(line: PamLine) -> str | None:
    """The command line of a pam_exec line (its words after pam_exec's own options)."""
    if line.module_name != "pam_exec.so":
        return None
    for i, arg in enumerate(line.args):
        if arg.startswith("/"):
            return " ".join(line.args[i:])
    return ""


def _is_ours(line: PamLine) -> bool:
    command = _pam_exec_command(line) or ""
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
    ours_at = [i for i, line in enumerate(session) if _is_ours(line)]
    if not ours_at:
        elsewhere = [line for line in lines if _is_ours(line)]
        value = ", ".join(f"{line.kind} line at {line.origin}" for line in elsewhere) or "missing"
        findings.append(Finding(HOLE, "pam", "ringfence line", value,
                                "sshd never asks the enforcer to place the connection in a session: logins are "
                                "not restricted, locks and connection limits are not checked at login, and port "
                                "forwarding (-L, -D) is not restricted",
                                f"append `{install.pam_line}` at the end of {install.pam_file}"))
        ours_index = len(session)  # where it goes: the checks below judge the stack against it
    else:
        ours_index = ours_at[0]
        findings.extend(_our_line(session[ours_index], install))
        findings.extend(_before_ours(session, ours_index))
        findings.extend(_after_ours(session, ours_index))
    findings.extend(_user_env(lines, session, ours_index))
    return findings


def _our_line(line: PamLine, install: Install) -> list[Finding]:
    command = _pam_exec_command(line) or ""
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


# ------------------------------------------------------------ hook files


@dataclass(frozen=True)
class FileStat:
    path: str
    uid: int
    gid: int
    mode: int


def hook_paths(force_command: str, pam_lines: Sequence[PamLine]) -> list[tuple[str, str]]:
    """(role, path) of the programs the hooks run: the interpreter or program, and a script."""
    commands = [("PAM hook (runs as root)", _pam_exec_command(line) or "")
                for line in pam_lines if line.kind == "session" and _is_ours(line)]
    commands.append(("ForceCommand wrapper (runs as each user)", force_command))
    return [(role, word) for role, command in commands for i, word in enumerate(command.split())
            if word.startswith("/") and (i == 0 or word.endswith(".py"))]


def writable_by_others(st: FileStat) -> str | None:
    """Why someone other than root can change this file or directory, or None."""
    if st.uid != 0:
        return f"owned by uid {st.uid}"
    if st.mode & stat.S_IWGRP and st.gid != 0:
        return f"writable by group {st.gid}"
    if st.mode & stat.S_IWOTH and not (stat.S_ISDIR(st.mode) and st.mode & stat.S_ISVTX):
        return "writable by everyone"
    return None


def file_findings(role: str, path: str, stats: Sequence[FileStat], exists: bool = True) -> list[Finding]:
    """A hook's files and every directory above them must be root's alone: whoever can change them runs
    code as root (the PAM hook) or as every user who logs in (the wrapper)."""
    if not exists:
        return [Finding(WARN, "files", role, path, "it does not exist: every login fails",
                        "install Ringfence there, or point the hook at where it is")]
    found = [Finding(HOLE, "files", role, st.path, f"{why}: whoever can change it runs code in the hook",
                     "chown root and chmod go-w it (and every directory above it)")
             for st in stats if (why := writable_by_others(st))]
    return found or [Finding(OK, "files", role, f"{path} ({len(stats)} files and directories, root's alone)")]
