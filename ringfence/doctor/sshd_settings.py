"""One effective sshd configuration (`sshd -T` output) and sshd's trusted CAs against Ringfence's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .findings import HOLE, OK, WARN, Finding, Install


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
