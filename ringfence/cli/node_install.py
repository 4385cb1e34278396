"""`ringfence node install` / `ringfence node uninstall`: set this host up as a node, and put
it back exactly as it was.

install writes (ringfence/node_setup.py decides the content):
- the sshd drop-in, read from the repository's examples/sshd_config.d/ringfence.conf;
  with this installation's ForceCommand (the isolated wrapper, ringfence/hooks/ssh_session.py);
- the PAM line in /etc/pam.d/sshd, right after `@include common-session` (the isolated hook,
  ringfence/hooks/pam_hook.py, run from the installed, root-owned package);
- /usr/local/bin/ringfence when it is missing;
- a systemd unit: the enforcer (`--config` from `node join`), or with --server `ringfence up`.
Every file it replaces is copied first under <root>/var/lib/ringfence/node-install/backup, and
a manifest records what it created, so uninstall restores each file byte for byte and removes
what it added (a file edited since is left alone, with a warning). Running install twice
changes nothing the second time. `--root DIR` works on a copy of a system (tests); services
are started and sshd reloaded only when DIR is / and systemd runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import node_setup
from ..config import DEFAULT_DATA_DIR, load_config
from ..node_setup import SetupError
from . import ssh_hooks
from .client import CliError

REPO = Path(__file__).resolve().parents[2]
DROP_IN = REPO / "examples" / "sshd_config.d" / "ringfence.conf"
STATE = "/var/lib/ringfence/node-install"
CLI_LINK = "/usr/local/bin/ringfence"
UNITS = {False: "ringfence-enforcer.service", True: "ringfence-up.service"}


@dataclass(frozen=True)
class Wanted:
    path: str  # as on the host, e.g. /etc/pam.d/sshd
    content: bytes = b""
    mode: int = 0o644
    link: str = ""  # a symlink to this instead of a file


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise SetupError(f"{what} {path} does not exist") from None


def plan(root: Path, args: argparse.Namespace) -> list[Wanted]:
    python = ssh_hooks.interpreter()
    data_dir = load_config(args.config).data_dir if args.config else DEFAULT_DATA_DIR
    node_setup.os_family(_read(_under(root, "/etc/os-release"), "the OS description"), python, data_dir)
    sshd_config = _read(_under(root, "/etc/ssh/sshd_config"), "the sshd configuration (apt-get install openssh-server)")
    if "sshd_config.d/" not in sshd_config:
        raise SetupError("/etc/ssh/sshd_config does not Include /etc/ssh/sshd_config.d/*.conf; add that line at its "
                         "top (Debian 11 and Ubuntu 20.04 have it) and run install again")
    pam = _read(_under(root, "/etc/pam.d/sshd"), "sshd's PAM stack (apt-get install openssh-server)")
    if not args.server and not args.config:
        raise SetupError("--config: the node configuration `ringfence node join` wrote (<data_dir>/node.yaml); "
                         "or --server for the control plane")
    venv_python = sys.executable
    if args.server:
        start = f"{venv_python} -I -m ringfence.cli.main up" + (f" --config {args.config}" if args.config else "")
        description = "Ringfence control plane: NATS and every service"
    else:
        start = f"{venv_python} -I -m services.enforcer --config {Path(args.config).resolve()}"
        description = "Ringfence enforcer: session controls for OpenSSH"
    wanted = [
        Wanted("/etc/ssh/sshd_config.d/ringfence.conf",
               node_setup.drop_in(DROP_IN.read_text(), python, data_dir).encode()),
        Wanted("/etc/pam.d/sshd", node_setup.add_pam_line(pam, node_setup.pam_line(python, data_dir)).encode()),
        Wanted(f"/etc/systemd/system/{UNITS[args.server]}", node_setup.unit(description, start).encode()),
    ]
    link = _under(root, CLI_LINK)
    if not link.exists() and not link.is_symlink():
        wanted.append(Wanted(CLI_LINK, link=str(Path(venv_python).with_name("ringfence"))))
    return wanted


class Manifest:
    """What install changed under `root`: {path: {"existed", "sha256", "backup"}} and the directories it made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = _under(root, STATE)
        self.path = self.dir / "manifest.json"
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.files: dict[str, dict] = data.get("files", {})
        self.dirs: list[str] = data.get("dirs", [])

    def make_dirs(self, path: Path) -> None:
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            self.dirs.append("/" + str(d.relative_to(self.root)))

    def save(self) -> None:
        self.make_dirs(self.dir)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"files": self.files, "dirs": self.dirs}, indent=2))
        os.replace(tmp, self.path)


def _current(target: Path, want: Wanted) -> bool:
    if want.link:
        return target.is_symlink() and os.readlink(target) == want.link
    return target.is_file() and not target.is_symlink() and target.read_bytes() == want.content


def install(root: Path, wanted: list[Wanted]) -> list[str]:
    """Write what differs; the paths changed (empty: everything was in place)."""
    manifest = Manifest(root)
    changed = []
    for want in wanted:
        target = _under(root, want.path)
        if _current(target, want):
            continue
        if want.path not in manifest.files:  # the state before our first change is what uninstall restores
            entry: dict = {"existed": target.exists() or target.is_symlink()}
            if entry["existed"]:
                backup = manifest.dir / "backup" / want.path.lstrip("/")
                manifest.make_dirs(backup.parent)
                shutil.copy2(target, backup, follow_symlinks=False)
                entry["backup"] = str(backup.relative_to(manifest.dir))
            manifest.files[want.path] = entry
        manifest.make_dirs(target.parent)
        tmp = target.with_name(f".{target.name}.ringfence-tmp")
        if want.link:
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(want.link)
        else:
            tmp.write_bytes(want.content)
            if target.exists():
                shutil.copystat(target, tmp)
                st = target.stat()
                os.chown(tmp, st.st_uid, st.st_gid)
            tmp.chmod(want.mode if not manifest.files[want.path]["existed"] else target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
        manifest.files[want.path]["sha256"] = "" if want.link else _sha(want.content)
        manifest.save()
        changed.append(want.path)
    return changed


def uninstall(root: Path) -> tuple[list[str], list[str]]:
    """Restore what install changed; (paths restored or removed, warnings)."""
    manifest = Manifest(root)
    if not manifest.path.exists():
        raise SetupError(f"nothing to undo: no {STATE}/manifest.json under {root} (was `ringfence node install` run?)")
    done, warnings = [], []
    for path, entry in reversed(list(manifest.files.items())):
        target = _under(root, path)
        ours = target.is_symlink() if not entry.get("sha256") else (
            target.is_file() and _sha(target.read_bytes()) == entry["sha256"])
        if not ours and (target.exists() or target.is_symlink()):
            if path == "/etc/pam.d/sshd":  # edited since: take out our line only
                target.write_text(node_setup.remove_pam_line(target.read_text()))
                warnings.append(f"{path} was edited after install: removed the Ringfence line, kept the rest")
            else:
                warnings.append(f"{path} was changed after install; left as it is")
            continue
        if entry["existed"]:
            backup = manifest.dir / entry["backup"]
            target.unlink(missing_ok=True)
            shutil.copy2(backup, target, follow_symlinks=False)
            st = backup.lstat()
            os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
        else:
            target.unlink(missing_ok=True)
        done.append(path)
    shutil.rmtree(manifest.dir / "backup", ignore_errors=True)
    manifest.path.unlink()
    for d in reversed(manifest.dirs):
        try:
            _under(root, d).rmdir()
        except OSError:  # not empty: something else lives there now
            pass
    return done, warnings


# --- the live system ---------------------------------------------------------------------------


def _systemd(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def _run(*argv: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SetupError(f"`{' '.join(argv)}` failed: {out.stderr.strip() or out.stdout.strip()}")


def run_install(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    try:
        wanted = plan(root, args)
        changed = install(root, wanted)
        if root == Path("/") and changed and shutil.which("sshd"):
            try:
                _run("sshd", "-t")
            except SetupError as exc:
                uninstall(root)
                raise SetupError(f"sshd rejects the configuration with Ringfence's drop-in, so everything was put "
                                 f"back: {exc}") from None
    except SetupError as exc:
        raise CliError(str(exc)) from None
    for path in changed:
        print(f"installed {path}")
    if not changed:
        print("everything is in place; nothing changed")
    unit = UNITS[args.server]
    if _systemd(root):
        _run("systemctl", "daemon-reload")
        _run("systemctl", "enable", "--now", unit)
        _run("systemctl", "reload-or-restart", "ssh")
        print(f"started {unit}; sshd reloaded")
        if "doctor" in _subcommands():
            return subprocess.run([sys.executable, "-m", "ringfence.cli.main", "doctor"]).returncode
    else:
        print(f"systemd is not running here{'' if root == Path('/') else ' (--root)'}: start {unit}'s command by "
              "hand, and reload sshd")
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    if _systemd(root):
        for unit in UNITS.values():
            subprocess.run(["systemctl", "disable", "--now", unit], capture_output=True)
    try:
        done, warnings = uninstall(root)
    except SetupError as exc:
        raise CliError(str(exc)) from None
    for path in done:
        print(f"restored {path}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if _systemd(root):
        _run("systemctl", "daemon-reload")
        _run("systemctl", "reload-or-restart", "ssh")
    return 0


def _subcommands() -> set[str]:
    from .main import build_parser

    parser = build_parser()
    return set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def register(group: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    install_p = group.add_parser("install", parents=[common], help="set this host up as a node (sshd, PAM, hook, "
                                 "systemd); idempotent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    install_p.add_argument("--server", action="store_true",
                           help="a control-plane node: a unit for `ringfence up` instead of the enforcer alone")
    install_p.add_argument("--root", default="/", metavar="DIR",
                           help="set up the system under DIR (an image, a copy of /etc) instead of this host")
    install_p.set_defaults(func=run_install)
    uninstall_p = group.add_parser("uninstall", parents=[common], help="put back everything `node install` changed",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    uninstall_p.add_argument("--root", default="/", metavar="DIR", help="the DIR given to install")
    uninstall_p.set_defaults(func=run_uninstall)
