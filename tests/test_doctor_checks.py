"""`ringfence doctor`'s checks (ringfence/doctor/): sshd -T output and PAM stacks in, holes out."""

from __future__ import annotations

import re

import pytest

from ringfence.doctor.findings import HOLE, OK, SSHD_DROP_IN, Finding, Install
from ringfence.doctor.hook_files import FileStat, file_findings, hook_paths, writable_by_others
from ringfence.doctor.pam_stack import flatten_pam, pam_findings, pam_includes
from ringfence.doctor.sshd_match import config_includes, match_blocks, match_findings, probe_spec
from ringfence.doctor.sshd_settings import CaFile, ca_findings, parse_public_keys, parse_sshd_t, sshd_findings

INSTALL = Install(python="/opt/rf/.venv/bin/python3", package="/opt/rf/ringfence")
WRAPPER = "/opt/rf/.venv/bin/python3 -I -S /opt/rf/ringfence/hooks/ssh_session.py --data-dir /var/lib/ringfence"
HOOK = "/opt/rf/.venv/bin/python3 -I -S /opt/rf/ringfence/hooks/pam_hook.py --data-dir /var/lib/ringfence"
OUR_LINE = f"session requisite pam_exec.so quiet stdout {HOOK}"

# `sshd -T` of a host set up as the README says.
GOOD_SSHD = {
    "usepam": "yes", "exposeauthinfo": "yes", "allowstreamlocalforwarding": "no", "x11forwarding": "no",
    "allowagentforwarding": "no", "permittunnel": "no", "permituserrc": "no", "permituserenvironment": "no",
    "permitrootlogin": "no", "allowtcpforwarding": "local", "permitlisten": "any", "disableforwarding": "no",
    "forcecommand": WRAPPER, "subsystem": "sftp internal-sftp", "trustedusercakeys": "none",
}


def sshd_t(**changes: str) -> str:
    settings = {**GOOD_SSHD, **changes}
    return "".join(f"{k} {v}\n" for k, v in settings.items() if v is not None)


def not_ok(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.status, f.setting, f.value) for f in findings if f.status != OK]


def test_a_host_set_up_as_the_readme_says_has_no_holes():
    findings = sshd_findings(parse_sshd_t(sshd_t()), INSTALL)
    assert not_ok(findings) == []
    assert {f.setting for f in findings} >= {"UsePAM", "ExposeAuthInfo", "ForceCommand", "Subsystem"}


@pytest.mark.parametrize(
    ("changes", "expected", "why"),
    [
        ({"usepam": "no"}, [("HOLE", "UsePAM", "no")], "PAM hook never runs"),
        ({"exposeauthinfo": "no"}, [("HOLE", "ExposeAuthInfo", "no")], "lock on a person"),
        ({"allowstreamlocalforwarding": "yes"}, [("HOLE", "AllowStreamLocalForwarding", "yes")],
         "the enforcer's among them"),
        ({"allowstreamlocalforwarding": "local"}, [("HOLE", "AllowStreamLocalForwarding", "local")], "ssh -L"),
        ({"allowstreamlocalforwarding": "remote"}, [("HOLE", "AllowStreamLocalForwarding", "remote")], "ssh -R"),
        ({"allowstreamlocalforwarding": "all"}, [("HOLE", "AllowStreamLocalForwarding", "all")], "ssh -R"),
        ({"allowstreamlocalforwarding": "yes", "disableforwarding": "yes"}, [], ""),
        ({"x11forwarding": "yes"}, [("HOLE", "X11Forwarding", "yes")], "X11"),
        ({"x11forwarding": "yes", "disableforwarding": "yes"}, [], ""),
        ({"allowagentforwarding": "yes"}, [("HOLE", "AllowAgentForwarding", "yes")], "ssh-agent"),
        ({"permittunnel": "point-to-point"}, [("HOLE", "PermitTunnel", "point-to-point")], "tun device"),
        ({"permittunnel": "yes", "disableforwarding": "yes"}, [("HOLE", "PermitTunnel", "yes")], "tun device"),
        ({"permituserrc": "yes"}, [("HOLE", "PermitUserRC", "yes")], "~/.ssh/rc"),
        ({"permituserenvironment": "yes"}, [("HOLE", "PermitUserEnvironment", "yes")], "LD_PRELOAD"),
        ({"permituserenvironment": "LANG,LC_*"}, [("HOLE", "PermitUserEnvironment", "LANG,LC_*")], "LD_PRELOAD"),
        ({"permitrootlogin": "yes"}, [("HOLE", "PermitRootLogin", "yes")], "with a password too"),
        ({"permitrootlogin": "without-password"}, [("WARN", "PermitRootLogin", "without-password")], "cgroup"),
        ({"permitrootlogin": "prohibit-password"}, [("WARN", "PermitRootLogin", "prohibit-password")], "cgroup"),
        ({"allowtcpforwarding": "yes"}, [("HOLE", "AllowTcpForwarding", "yes, PermitListen any")], "ssh -R"),
        ({"allowtcpforwarding": "remote"}, [("HOLE", "AllowTcpForwarding", "remote, PermitListen any")], "ssh -R"),
        ({"allowtcpforwarding": "all", "permitlisten": "localhost:8080"},
         [("HOLE", "AllowTcpForwarding", "all, PermitListen localhost:8080")], "ssh -R"),
        ({"allowtcpforwarding": "yes", "permitlisten": "none"}, [], ""),
        ({"allowtcpforwarding": "yes", "disableforwarding": "yes"}, [], ""),
        ({"allowtcpforwarding": "no"}, [], ""),
        ({"forcecommand": "none"}, [("HOLE", "ForceCommand", "none")],
         "subsystems run without Ringfence's wrapper (subsystems too: sftp)"),
        ({"forcecommand": "/bin/bash"}, [("HOLE", "ForceCommand", "/bin/bash")], "/bin/bash runs instead"),
        ({"forcecommand": "internal-sftp -d /srv"}, [("HOLE", "ForceCommand", "internal-sftp -d /srv")],
         "sftp runs inside sshd"),
        ({"forcecommand": "/opt/rf/ringfence/hooks/ssh_session.py.orig"},
         [("HOLE", "ForceCommand", "/opt/rf/ringfence/hooks/ssh_session.py.orig")], "runs instead"),
        # The CLI wrapper of old (the whole CLI, as the user, owning the terminal) is gone.
        ({"forcecommand": "/usr/local/bin/ringfence ssh-session --data-dir /srv/rf"},
         [("HOLE", "ForceCommand", "/usr/local/bin/ringfence ssh-session --data-dir /srv/rf")], ""),
        ({"forcecommand": f"{WRAPPER} --socket /run/rf/enforcer.sock"}, [], ""),
        ({"usepam": None, "exposeauthinfo": None}, [("HOLE", "UsePAM", "no"), ("HOLE", "ExposeAuthInfo", "no")],
         ""),  # an sshd too old to print them does not have them
    ],
)
def test_each_sshd_setting_that_opens_a_hole_is_named_with_its_fix(changes, expected, why):
    findings = sshd_findings(parse_sshd_t(sshd_t(**changes)), INSTALL)
    assert not_ok(findings) == expected
    for finding in findings:
        if finding.status != OK:
            assert why in finding.why
            assert finding.fix and finding.fix_in == SSHD_DROP_IN


def test_the_forcecommand_fix_names_the_installed_wrapper_and_another_form_can_be_expected():
    (hole,) = [f for f in sshd_findings(parse_sshd_t(sshd_t(forcecommand="none")), INSTALL)
               if f.status != OK]
    assert hole.fix == f"ForceCommand {WRAPPER}"
    custom = Install(force_command=re.compile(r"^/usr/sbin/our-wrapper$"))
    settings = parse_sshd_t(sshd_t(forcecommand="/usr/sbin/our-wrapper"))
    assert not_ok(sshd_findings(settings, custom)) == []
    assert not_ok(sshd_findings(parse_sshd_t(sshd_t()), custom)) == [("HOLE", "ForceCommand", WRAPPER)]


def test_a_finding_prints_as_one_line_with_its_fix():
    finding = Finding(HOLE, "sshd", "AllowStreamLocalForwarding", "yes", "a client can open it",
                         "AllowStreamLocalForwarding no", SSHD_DROP_IN)
    assert finding.line() == ("HOLE  sshd AllowStreamLocalForwarding yes: a client can open it. Fix: "
                              "AllowStreamLocalForwarding no in /etc/ssh/sshd_config.d/ringfence.conf")
    assert Finding(OK, "sshd", "UsePAM", "yes").line() == "ok    sshd UsePAM yes"


# ------------------------------------------------------------------ Match blocks

CONFIG = """\
# comment
Include /etc/ssh/sshd_config.d/*.conf
UsePAM yes
Match User alice,b*
    ForceCommand internal-sftp
Match User b*,!bob
Match User !root
Match Group sftponly
Match Group nobodyhere
Match Address 10.0.0.0/8 User carol
Match Address 192.168.1.*
Match Host *.corp LocalPort 2222
Match all
Match=User dave
"""


def test_match_blocks_are_read_with_where_they_are():
    blocks = match_blocks(CONFIG, "/etc/ssh/sshd_config")
    assert [b.origin for b in blocks][:2] == ["/etc/ssh/sshd_config:4", "/etc/ssh/sshd_config:6"]
    assert blocks[0].text == "Match User alice,b*"
    assert blocks[0].criteria == (("user", "alice,b*"),)
    assert blocks[-2].criteria == ()
    assert config_includes(CONFIG) == ["/etc/ssh/sshd_config.d/*.conf"]


@pytest.mark.parametrize(
    ("index", "spec"),
    [
        (0, "user=alice,host=doctor.invalid,addr=192.0.2.1"),
        (1, "user=bx,host=doctor.invalid,addr=192.0.2.1"),
        (2, None),  # only negations: matches nobody
        (3, "user=erin,host=doctor.invalid,addr=192.0.2.1"),  # a member of the group
        (4, None),  # a group without members
        (5, "user=carol,host=doctor.invalid,addr=10.0.0.0"),
        (6, "user=ringfence-doctor,host=doctor.invalid,addr=192.168.1.1"),
        (7, "user=ringfence-doctor,host=1.corp,addr=192.0.2.1,lport=2222"),
        (8, None),  # Match all: sshd -T applies it already
        (9, "user=dave,host=doctor.invalid,addr=192.0.2.1"),
    ],
)
def test_a_probe_is_a_connection_the_match_block_applies_to(index, spec):
    block = match_blocks(CONFIG, "sshd_config")[index]
    assert probe_spec(block, {"sftponly": ["frank", "erin"], "nobodyhere": []}) == spec


def test_a_match_block_reports_only_what_it_adds():
    base = sshd_findings(parse_sshd_t(sshd_t(x11forwarding="yes")), INSTALL)
    probed = sshd_findings(parse_sshd_t(sshd_t(x11forwarding="yes", forcecommand="internal-sftp")), INSTALL)
    block = match_blocks(CONFIG, "/etc/ssh/sshd_config")[0]
    spec = "user=alice,host=doctor.invalid,addr=192.0.2.1"
    (added,) = match_findings(base, probed, block, spec)
    assert (added.status, added.setting, added.value) == ("HOLE", "ForceCommand", "internal-sftp")
    assert added.where == f"Match User alice,b* at /etc/ssh/sshd_config:4, probed with -C {spec}"
    assert added.fix_in == "that Match block"


# ------------------------------------------------------ certificate authorities

CA1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIone ca-one"
CA2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItwo ca-two"


def ca(path: str, *lines: str) -> CaFile:
    return CaFile(path, parse_public_keys("# CAs\n\n" + "\n".join(lines))) if path else CaFile("")


@pytest.mark.parametrize(
    ("sshd", "ours", "status", "why"),
    [
        (ca(""), ca(""), "WARN", "no certificate authority is trusted"),
        (ca("/etc/ssh/ca.pub", CA1), ca(""), "HOLE", "Ringfence trusts none"),
        (ca("/etc/ssh/ca.pub", CA1, CA2), ca("/etc/rf/ca.pub", CA1), "HOLE", "1 CA key(s) sshd trusts"),
        (ca("/etc/ssh/ca.pub", CA1), ca("/etc/rf/ca.pub", CA1, CA2), "WARN", "Ringfence trusts 1 CA key(s)"),
        (ca(""), ca("/etc/rf/ca.pub", CA1), "WARN", "Ringfence trusts 1 CA key(s)"),
        (ca("/etc/ssh/ca.pub", CA1, CA2), ca("/etc/ssh/ca.pub", CA2 + " other comment", CA1), "ok", ""),
        (CaFile("/etc/ssh/ca.pub", None, "Permission denied"), ca(""), "HOLE", "Permission denied"),
    ],
)
def test_trusted_cas_of_sshd_and_ringfence_are_compared_by_key(sshd, ours, status, why):
    (finding,) = ca_findings(sshd, ours, "/etc/ringfence.yaml", INSTALL)
    assert finding.status == status
    assert why in finding.why


# ----------------------------------------------------------------------- PAM

# Debian 12's stock files (comments trimmed).
STOCK = {
    "common-auth": "auth [success=1 default=ignore] pam_unix.so nullok\nauth requisite pam_deny.so\n"
                   "auth required pam_permit.so\n",
    "common-account": "account [success=1 new_authtok_reqd=done default=ignore] pam_unix.so\n"
                      "account requisite pam_deny.so\naccount required pam_permit.so\n",
    "common-session": "session [default=1] pam_permit.so\nsession requisite pam_deny.so\n"
                      "session required pam_permit.so\nsession required pam_unix.so\n"
                      "session optional pam_systemd.so\n",
    "common-password": "password [success=1 default=ignore] pam_unix.so obscure yescrypt\n"
                       "password requisite pam_deny.so\npassword required pam_permit.so\n",
}
SSHD_STOCK = """\
@include common-auth
account    required     pam_nologin.so
@include common-account
session [success=ok ignore=ignore module_unknown=ignore default=bad]        pam_selinux.so close
session    required     pam_loginuid.so
session    optional     pam_keyinit.so force revoke
@include common-session
session    optional     pam_motd.so  motd=/run/motd.dynamic
session    optional     pam_motd.so noupdate
session    optional     pam_mail.so standard noenv # [1]
session    required     pam_limits.so
session    required     pam_env.so # [1]
session    required     pam_env.so user_readenv=1 envfile=/etc/default/locale
session [success=ok ignore=ignore module_unknown=ignore default=bad]        pam_selinux.so open
@include common-password
"""
SSHD_FIXED = SSHD_STOCK.replace("user_readenv=1 ", "")


def pam(sshd: str, **files: str) -> list[Finding]:
    lines, problems = flatten_pam("/etc/pam.d/sshd", {**STOCK, **files, "/etc/pam.d/sshd": sshd})
    return pam_findings(lines, problems, INSTALL)


@pytest.mark.parametrize(
    ("sshd", "files", "expected"),
    [
        (SSHD_FIXED + OUR_LINE, {}, []),
        (SSHD_STOCK + OUR_LINE, {}, [("HOLE", "session pam_env.so", "user_readenv=1 envfile=/etc/default/locale")]),
        # After ours, user_readenv no longer reaches the hook.
        (SSHD_STOCK.replace("session    required     pam_limits.so", OUR_LINE), {}, []),
        (SSHD_FIXED, {}, [("HOLE", "ringfence line", "missing")]),
        (SSHD_FIXED + OUR_LINE.replace("session", "auth", 1), {},
         [("HOLE", "ringfence line", "auth line at /etc/pam.d/sshd:16")]),
        (SSHD_FIXED.replace("@include common-session", OUR_LINE + "\n@include common-session"), {},
         [("HOLE", "session line after ringfence's", "session optional pam_systemd.so")]),
        (SSHD_FIXED + OUR_LINE + "\n-session optional pam_systemd.so\n", {},
         [("HOLE", "session line after ringfence's", "session optional pam_systemd.so")]),
        (SSHD_FIXED + OUR_LINE.replace("requisite", "optional"), {},
         [("HOLE", "ringfence line control", "optional")]),
        (SSHD_FIXED + OUR_LINE.replace("required", "requisite"), {}, []),
        (SSHD_FIXED + OUR_LINE.replace(" stdout", ""), {}, [("WARN", "pam_exec options", "quiet")]),
        (SSHD_FIXED + "session required pam_exec.so quiet stdout /usr/local/bin/ringfence pam-hook", {},
         [("WARN", "ringfence line", "session required pam_exec.so quiet stdout /usr/local/bin/ringfence "
           "pam-hook")]),
        (SSHD_FIXED + OUR_LINE.replace(" -I -S", ""), {},
         [("HOLE", "ringfence line", OUR_LINE.replace(" -I -S", ""))]),
        # user_readenv in the auth stack reaches the hook wherever it is (pam_setcred runs before the session).
        (SSHD_FIXED + OUR_LINE, {"common-auth": STOCK["common-auth"] + "auth required pam_env.so user_readenv=1"},
         [("HOLE", "auth pam_env.so", "user_readenv=1")]),
        # Lines that let PAM skip ours.
        (SSHD_FIXED + "session sufficient pam_permit.so\n" + OUR_LINE, {},
         [("HOLE", "session line before ringfence's", "session sufficient pam_permit.so")]),
        (SSHD_FIXED + "session [success=1 default=ignore] pam_succeed_if.so user ingroup admins\n" + OUR_LINE, {},
         [("HOLE", "session line before ringfence's",
           "session [success=1 default=ignore] pam_succeed_if.so user ingroup admins")]),
        (SSHD_FIXED + "session [success=1 default=ignore] pam_succeed_if.so user ingroup admins\n"
         "session optional pam_echo.so hi\n" + OUR_LINE, {}, []),
        (SSHD_FIXED + "session [default=done] pam_permit.so\n" + OUR_LINE, {},
         [("HOLE", "session line before ringfence's", "session [default=done] pam_permit.so")]),
        # A substack's `sufficient` ends only the substack; an include's ends the whole stack.
        (SSHD_FIXED + "session substack extra\n" + OUR_LINE, {"extra": "session sufficient pam_permit.so\n"}, []),
        (SSHD_FIXED + "session include extra\n" + OUR_LINE, {"extra": "session sufficient pam_permit.so\n"},
         [("HOLE", "session line before ringfence's", "session sufficient pam_permit.so")]),
        # A jump counts a substack as one module.
        (SSHD_FIXED + "session [success=1 default=ignore] pam_succeed_if.so user ingroup admins\n"
         "session substack extra\n" + OUR_LINE,
         {"extra": "session optional pam_echo.so a\nsession optional pam_echo.so b\n"}, []),
        (SSHD_FIXED + "session [success=2 default=ignore] pam_succeed_if.so user ingroup admins\n"
         "session substack extra\n" + OUR_LINE,
         {"extra": "session optional pam_echo.so a\nsession optional pam_echo.so b\n"},
         [("HOLE", "session line before ringfence's",
           "session [success=2 default=ignore] pam_succeed_if.so user ingroup admins")]),
        # `include` takes only the lines of its type.
        (SSHD_FIXED + "session include extra\n" + OUR_LINE,
         {"extra": "auth sufficient pam_permit.so\nsession required pam_permit.so\n"}, []),
        (SSHD_FIXED + "@include missing-file\n" + OUR_LINE, {},
         [("WARN", "file", "missing-file: not found")]),
    ],
)
def test_each_pam_setting_that_opens_a_hole_is_named(sshd, files, expected):
    assert not_ok(pam(sshd, **files)) == expected


def test_pam_findings_say_where_the_line_is_and_how_to_fix_it():
    (hole,) = [f for f in pam(SSHD_STOCK + OUR_LINE) if f.status != OK]
    assert hole.where == "/etc/pam.d/sshd:13"
    assert "~/.pam_environment" in hole.why and "LD_PRELOAD" in hole.why
    assert hole.fix == "remove user_readenv=1 from that line" and hole.fix_in == "/etc/pam.d/sshd"
    (missing,) = [f for f in pam(SSHD_FIXED) if f.status != OK]
    assert missing.fix == (f"add `{INSTALL.pam_line}` right after `@include common-session` (after pam_systemd, "
                           "before any pam_env) in /etc/pam.d/sshd")
    assert INSTALL.pam_line == OUR_LINE


def test_pam_lines_with_brackets_continuations_and_comments_are_read_as_pam_does():
    text = ("session [success=ok default=bad] pam_exec.so quiet stdout [/opt/x y/ringfence] # comment\n"
            "session required \\\n  pam_limits.so conf=/etc/limits\n# session required pam_env.so\n"
            "-session optional pam_systemd.so\n@include other\n")
    lines, problems = flatten_pam("f", {"f": text, "other": "auth required pam_deny.so\n"})
    assert problems == []
    assert [(x.kind, x.control, x.module_name, x.args, x.origin) for x in lines] == [
        ("session", "[success=ok default=bad]", "pam_exec.so", ("quiet", "stdout", "[/opt/x y/ringfence]"), "f:1"),
        ("session", "required", "pam_limits.so", ("conf=/etc/limits",), "f:2"),
        ("session", "optional", "pam_systemd.so", (), "f:5"),
        ("auth", "required", "pam_deny.so", (), "other:1"),
    ]
    assert pam_includes(text + "session include common-session\nauth substack x\n") == [
        "other", "common-session", "x"]


def test_an_include_loop_stops():
    lines, problems = flatten_pam("a", {"a": "@include b\n", "b": "@include a\n"})
    assert lines == [] and problems == ["b: included more than 16 deep"]


# ------------------------------------------------------------------ hook files


@pytest.mark.parametrize(
    ("uid", "gid", "mode", "why"),
    [
        (0, 0, 0o100755, None),
        (0, 0, 0o100775, None),  # group root: root's alone
        (0, 0, 0o041777, None),  # /tmp-like: others cannot replace root's entries
        (1000, 1000, 0o100644, "owned by uid 1000"),
        (0, 100, 0o040775, "writable by group 100"),
        (0, 0, 0o040777, "writable by everyone"),
        (0, 0, 0o100666, "writable by everyone"),
    ],
)
def test_hook_files_must_be_roots_alone(uid, gid, mode, why):
    assert writable_by_others(FileStat("/p", uid, gid, mode)) == why


def test_the_files_each_hook_runs_are_named():
    lines, _ = flatten_pam("f", {"f": f"{OUR_LINE} --socket /run/rf.sock\nsession required pam_exec.so "
                                         "/usr/local/bin/ringfence pam-hook --data-dir /srv/rf\n"})
    assert hook_paths(WRAPPER, lines) == [
        ("PAM hook (runs as root)", "/opt/rf/.venv/bin/python3"),
        ("PAM hook (runs as root)", "/opt/rf/ringfence/hooks/pam_hook.py"),
        ("PAM hook (runs as root)", "/usr/local/bin/ringfence"),
        ("ForceCommand wrapper (runs as each user)", "/opt/rf/.venv/bin/python3"),
        ("ForceCommand wrapper (runs as each user)", "/opt/rf/ringfence/hooks/ssh_session.py"),
    ]
    writable = FileStat("/opt/rf/ringfence/runtime", 1000, 1000, 0o40755)
    (hole,) = file_findings("PAM hook (runs as root)", "/opt/rf/ringfence/hooks/pam_hook.py", [writable])
    assert (hole.status, hole.value) == ("HOLE", "/opt/rf/ringfence/runtime")
    (gone,) = file_findings("PAM hook (runs as root)", "/nope", [], exists=False)
    assert gone.status == "WARN" and "every login fails" in gone.why
