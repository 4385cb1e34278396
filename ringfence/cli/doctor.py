"""`ringfence doctor`: name every sshd and PAM setting that opens a hole in Ringfence's controls.

Reads the live sshd configuration (`sshd -T`, and `sshd -T -C user=...,host=...,addr=...`
for each Match block, to see what it changes for the connections it matches), sshd's
PAM stack (/etc/pam.d/<sshd's name>, includes followed) and the files the hooks run,
and prints each hole with its fix. Run it as root (sshd -T reads the host keys).

Exit status: 0 no hole found, 1 a hole found, 2 the configuration could not be read.
The checks themselves are ringfence/doctor/.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
from fnmatch import fnmatchcase
from pathlib import Path

from ..config import DEFAULT_CONFIG_PATH, DEFAULT_DATA_DIR, ENV_CONFIG, ConfigError, load_config
from ..doctor import hook_files, pam_stack, sshd_match, sshd_settings
from ..doctor.findings import FORCE_COMMAND, HOLE, OK, SSHD_DROP_IN, WARN, Finding, Install
from . import ssh_hooks
from .client import CliError

SSHD_CONFIG = "/etc/ssh/sshd_config"
SSHD_CONFIG_DIR = "/etc/ssh"  # sshd's base for relative Include paths
PAM_DIRS = ("/etc/pam.d", "/usr/lib/pam.d")
PACKAGE = Path(__file__).resolve().parents[1]
SSHD_FIRST_VALUE = ("(sshd keeps the first value it reads for a setting: no line read before the fix, in an "
                    "earlier drop-in or above the Include, may set it)")


def sshd_t(sshd: str, config: str | None, spec: str | None = None) -> str:
    argv = [sshd, "-T", *(["-f", config] if config else []), *(["-C", spec] if spec else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise CliError(f"cannot run {sshd}: {exc.strerror}; name sshd with --sshd PATH", exit_code=2) from None
    if done.returncode != 0:
        hint = "" if os.geteuid() == 0 else " (run ringfence doctor as root: sshd -T reads the host keys)"
        raise CliError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()}{hint}",
                       exit_code=2)
    return done.stdout


def include_pattern(pattern: str) -> str:
    return pattern if pattern.startswith("/") else f"{SSHD_CONFIG_DIR}/{pattern}"


def read_sshd_configs(path: str) -> list[tuple[str, str]]:
    """(path, text) of the config and every file it Includes, in sshd's order."""
    seen: list[tuple[str, str]] = []

    def read(file: str, depth: int) -> None:
        try:
            text = Path(file).read_text(errors="replace")
        except OSError as exc:
            raise CliError(f"cannot read {file}: {exc.strerror}", exit_code=2) from None
        seen.append((file, text))
        for pattern in sshd_match.config_includes(text):
            for included in sorted(glob.glob(include_pattern(pattern))):
                if depth < 16:
                    read(included, depth + 1)

    read(path, 0)
    return seen


def sshd_fix_file(configs: list[tuple[str, str]]) -> str:
    """Where a global sshd setting goes: Ringfence's drop-in when the config includes one."""
    included = [path for path, _ in configs[1:]]
    patterns = [include_pattern(p) for _, text in configs for p in sshd_match.config_includes(text)]
    ours = [path for path in included if os.path.basename(path) == os.path.basename(SSHD_DROP_IN)]
    if ours:
        return ours[0]
    if any(fnmatchcase(SSHD_DROP_IN, pattern) for pattern in patterns):
        return SSHD_DROP_IN
    return f"{configs[0][0]}, before any Match block"


def read_pam_files(main: str) -> dict[str, str | None]:
    """The PAM file and every file it includes, by the name it is included as (None: not found)."""
    files: dict[str, str | None] = {}
    todo = [main]
    while todo:
        name = todo.pop()
        if name in files:
            continue
        candidates = [name] if name == main or name.startswith("/") else [
            f"{d}/{name}" for d in (str(Path(main).parent), *PAM_DIRS)]
        files[name] = next((Path(c).read_text(errors="replace") for c in candidates if Path(c).is_file()), None)
        todo.extend(pam_stack.pam_includes(files[name] or ""))
    return files


def group_members() -> dict[str, list[str]]:
    groups = grp.getgrall()
    members = {g.gr_name: list(g.gr_mem) for g in groups}
    names = {g.gr_gid: g.gr_name for g in groups}
    for user in pwd.getpwall():
        if user.pw_gid in names:
            members[names[user.pw_gid]].append(user.pw_name)
    return members


def ca_file(path: str) -> sshd_settings.CaFile:
    if not path or path == "none":
        return sshd_settings.CaFile("")
    try:
        return sshd_settings.CaFile(path, sshd_settings.parse_public_keys(Path(path).read_text()))
    except OSError as exc:
        return sshd_settings.CaFile(path, None, exc.strerror or str(exc))


def hook_file_stats(path: str) -> tuple[list[hook_files.FileStat], bool]:
    """The program, what it links to, every directory above them and, for a script of ours, the whole
    ringfence package it imports. False when the program does not exist."""
    if not os.path.exists(path):
        return [], False
    real = Path(path).resolve()
    paths = {real, *Path(path).parents, *real.parents}
    if real.parent.name == "hooks" and real.parent.parent.name == "ringfence":
        for root, dirs, files in os.walk(real.parent.parent):  # __pycache__ too: Python loads what is there
            paths.update(Path(root, name) for name in [*dirs, *files])
    stats = []
    for p in sorted(paths):
        st = os.stat(p)
        stats.append(hook_files.FileStat(str(p), st.st_uid, st.st_gid, st.st_mode))
    return stats, True


def gather(args: argparse.Namespace) -> list[Finding]:
    sshd = args.sshd or shutil.which("sshd") or "/usr/sbin/sshd"
    configs = read_sshd_configs(args.sshd_config or SSHD_CONFIG)
    pam_file = args.pam_file or f"{PAM_DIRS[0]}/{os.path.basename(sshd)}"  # sshd's PAM service is its name
    try:
        force = re.compile(args.force_command) if args.force_command else FORCE_COMMAND
    except re.error as exc:
        raise CliError(f'--force-command "{args.force_command}": not a regular expression: {exc}',
                       exit_code=2) from None
    install = Install(python=ssh_hooks.interpreter(), package=str(PACKAGE), sshd_fix_in=sshd_fix_file(configs),
                      pam_file=pam_file, force_command=force, data_dir=args.data_dir or DEFAULT_DATA_DIR)

    base_settings = sshd_settings.parse_sshd_t(sshd_t(sshd, args.sshd_config))
    findings = sshd_settings.sshd_findings(base_settings, install)
    members = group_members()
    for path, text in configs:
        for block in sshd_match.match_blocks(text, path):
            spec = sshd_match.probe_spec(block, members)
            if spec is None:
                if block.criteria:
                    findings.append(Finding(OK, "sshd", "Match", "not probed (no user it applies "
                                                   "to can be named)", where=f"{block.text} at {block.origin}"))
                continue
            probed_settings = sshd_settings.parse_sshd_t(sshd_t(sshd, args.sshd_config, spec))
            probed = sshd_settings.sshd_findings(probed_settings, install)
            findings.extend(sshd_match.match_findings(findings, probed, block, spec))

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), exit_code=2) from None
    config_file = args.config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    ours = getattr(cfg.ssh_service, "trusted_user_ca_keys", "")  # the key arrives with issue 11's identity work
    sshd_cas = ca_file(sshd_settings.first(base_settings, "trustedusercakeys"))
    findings += sshd_settings.ca_findings(sshd_cas, ca_file(ours), config_file, install)

    lines, problems = pam_stack.flatten_pam(pam_file, read_pam_files(pam_file))
    findings += pam_stack.pam_findings(lines, problems, install)

    for role, path in hook_files.hook_paths(sshd_settings.first(base_settings, "forcecommand"), lines):
        stats, exists = hook_file_stats(path)
        findings += hook_files.file_findings(role, path, stats, exists)
    return findings


def run(args: argparse.Namespace) -> int:
    findings = gather(args)
    holes = sum(f.status == HOLE for f in findings)
    warnings = sum(f.status == WARN for f in findings)
    if args.format == "json":
        print(json.dumps({"holes": holes, "warnings": warnings,
                          "findings": [dataclasses.asdict(f) for f in findings]}, indent=2))
    else:
        for finding in findings:
            if finding.status != OK or args.verbose:
                print(finding.line())
        if any(f.source == "sshd" and f.status != OK for f in findings):
            print(SSHD_FIRST_VALUE)
        print(f"{holes} hole(s), {warnings} warning(s)" if holes or warnings else "no holes found")
    return 1 if holes else 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", help="name every sshd and PAM setting that opens a hole, with its fix",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="Ringfence config file, for ssh_service.trusted_user_ca_keys "
                                    "(default: /etc/ringfence.yaml when present)")
    p.add_argument("--sshd", metavar="PATH", help="the sshd binary (default: sshd on PATH, else /usr/sbin/sshd)")
    p.add_argument("--sshd-config", metavar="FILE", help=f"check this sshd config (sshd -f) instead of {SSHD_CONFIG}")
    p.add_argument("--pam-file", metavar="FILE", help="check this PAM file instead of /etc/pam.d/<sshd's name>")
    p.add_argument("--force-command", metavar="REGEX",
                   help="what an acceptable ForceCommand looks like (default: the wrapper, "
                        "`.../python3 -I -S .../ringfence/hooks/ssh_session.py`, as `ringfence hooks` prints it)")
    p.add_argument("--data-dir", help="the enforcer's data dir, for the fixes' hook lines "
                                      f"(default: {DEFAULT_DATA_DIR})")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--verbose", "-v", action="store_true", help="also print the checks that passed")
    p.set_defaults(func=run)
