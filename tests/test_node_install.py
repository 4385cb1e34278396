"""`ringfence node install` / `uninstall` on a scratch copy of this host's /etc (Debian's stock
sshd and PAM files): the right lines in the right place, idempotent, and uninstall leaves the
copy byte-identical; a stack it cannot place the hook in safely is refused untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringfence import node_setup
from ringfence.cli.ssh_hooks import force_command, interpreter, pam_line
from ringfence.node_setup import SetupError, add_pam_line, os_family, remove_pam_line
from tests.support.procs import ROOT

PAM_LINE = pam_line("/var/lib/ringfence")

STOCK_PAM = """# PAM configuration for the Secure Shell service
@include common-auth
account    required     pam_nologin.so
@include common-account
session [success=ok ignore=ignore module_unknown=ignore default=bad]        pam_selinux.so close
session    required     pam_loginuid.so
@include common-session
session    optional     pam_motd.so  motd=/run/motd.dynamic
session    required     pam_env.so # [1]
session    required     pam_env.so user_readenv=1 envfile=/etc/default/locale
@include common-password
"""


def test_the_pam_line_goes_right_after_common_session_and_before_user_readenv():
    added = add_pam_line(STOCK_PAM, PAM_LINE)
    lines = added.splitlines()
    at = lines.index(PAM_LINE)
    assert lines[at - 1] == "@include common-session"
    assert at < next(i for i, line in enumerate(lines) if "user_readenv=1" in line)
    assert add_pam_line(added, PAM_LINE) == added  # once only
    assert remove_pam_line(added) == STOCK_PAM
    assert add_pam_line("@include common-session", PAM_LINE).endswith("@include common-session\n" + PAM_LINE + "\n")
    # An older line of ours (another interpreter or data dir) is replaced, not kept beside the new one.
    moved = add_pam_line(added, pam_line("/srv/rf"))
    assert moved.count("pam_hook.py") == 1 and "--data-dir /srv/rf" in moved


@pytest.mark.parametrize(("text", "reason"), [
    ("session required pam_env.so user_readenv=1\n@include common-session\n", "line 1 reads the user's"),
    ("@include common-auth\n", "no `@include common-session` line"),
])
def test_a_stack_where_the_hook_cannot_go_safely_is_refused(text, reason):
    with pytest.raises(SetupError, match=reason):
        add_pam_line(text, PAM_LINE)


@pytest.mark.parametrize(("release", "family"), [
    ('ID=debian\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n', "debian"),
    ("ID=ubuntu\nID_LIKE=debian\n", "ubuntu"),
    ("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n", "ubuntu"),
])
def test_debian_and_ubuntu_and_their_derivatives_are_known(release, family):
    assert os_family(release) == family


def test_other_systems_are_told_what_to_set_up_by_hand():
    with pytest.raises(SetupError) as exc:
        os_family('ID=fedora\nPRETTY_NAME="Fedora Linux 40"\n')
    assert "Fedora Linux 40" in str(exc.value) and "pam_hook.py" in str(exc.value)
    assert "ssh_session.py" in str(exc.value)


# --- on a scratch copy of /etc -----------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: its bytes (or link target), mode and owner."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = os.readlink(path) if path.is_symlink() else (path.read_bytes() if path.is_file() else None)
        found[str(path.relative_to(root))] = (content, st.st_mode, st.st_uid, st.st_gid)
    return found


@pytest.fixture
def scratch(tmp_path):
    if not Path("/etc/pam.d/sshd").exists():
        pytest.skip("openssh-server is not installed (make setup installs it)")
    root = tmp_path / "root"
    (root / "etc" / "ssh").mkdir(parents=True)
    shutil.copytree("/etc/pam.d", root / "etc" / "pam.d", symlinks=True)
    shutil.copy2("/etc/ssh/sshd_config", root / "etc" / "ssh" / "sshd_config")
    if Path("/etc/ssh/sshd_config.d").is_dir():
        shutil.copytree("/etc/ssh/sshd_config.d", root / "etc" / "ssh" / "sshd_config.d", symlinks=True)
    shutil.copy2("/etc/os-release", root / "etc" / "os-release", follow_symlinks=True)
    config = tmp_path / "node.yaml"
    config.write_text("nodename: scratch\n")
    return root, config


def node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", "node", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_install_then_uninstall_leaves_the_copy_byte_identical(scratch):
    root, config = scratch
    pristine = snapshot(root)
    first = node("install", "--root", str(root), "--config", str(config))
    assert first.returncode == 0, first.stderr
    pam = (root / "etc/pam.d/sshd").read_text().splitlines()
    assert pam[pam.index(PAM_LINE) - 1].split() == ["@include", "common-session"]
    drop_in = (root / "etc/ssh/sshd_config.d/ringfence.conf").read_text()
    assert force_command("/var/lib/ringfence") in drop_in.splitlines()  # the isolated wrapper
    assert f"{interpreter()} -I -S " in PAM_LINE and (node_setup.HOOKS_DIR / "pam_hook.py").stat().st_uid == 0
    unit = (root / "etc/systemd/system/ringfence-enforcer.service").read_text()
    assert f"-m services.enforcer --config {config}" in unit
    assert (root / "etc/pam.d/sshd").stat().st_mode == pristine["etc/pam.d/sshd"][1]  # mode kept

    installed = snapshot(root)
    second = node("install", "--root", str(root), "--config", str(config))
    assert second.returncode == 0 and "nothing changed" in second.stdout
    assert snapshot(root) == installed

    out = node("uninstall", "--root", str(root))
    assert out.returncode == 0, out.stderr
    assert snapshot(root) == pristine


def test_uninstall_keeps_later_edits_and_takes_out_only_the_hook_line(scratch):
    root, config = scratch
    original = (root / "etc/pam.d/sshd").read_text()
    assert node("install", "--root", str(root), "--config", str(config)).returncode == 0
    pam = root / "etc/pam.d/sshd"
    pam.write_text(pam.read_text() + "# added by an admin later\n")
    out = node("uninstall", "--root", str(root))
    assert out.returncode == 0
    assert "edited after install" in out.stderr
    assert pam.read_text() == original + "# added by an admin later\n"


def test_a_refused_install_changes_nothing(scratch):
    root, config = scratch
    pam = root / "etc/pam.d/sshd"
    pam.write_text("session required pam_env.so user_readenv=1\n" + pam.read_text())
    before = snapshot(root)
    out = node("install", "--root", str(root), "--config", str(config))
    assert out.returncode == 1
    assert "reads the user's ~/.pam_environment" in out.stderr
    assert snapshot(root) == before
    missing = node("install", "--root", str(root))
    assert missing.returncode == 1 and "--config" in missing.stderr
    assert node("uninstall", "--root", str(root)).stderr.startswith("ERROR: nothing to undo")
