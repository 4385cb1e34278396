"""`ringfence doctor` against a real sshd (`sshd -T -f <temp config>`, `-C` for each Match block)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import is_root
from tests.support.sshd import RINGFENCE, SSHD, keygen

pytestmark = pytest.mark.skipif(not is_root(), reason="sshd -T reads host keys: needs root")

PACKAGE = Path(__file__).resolve().parents[1] / "ringfence"
# A host set up as the README says.
GOOD = f"""\
UsePAM yes
ExposeAuthInfo yes
ForceCommand {sys.executable} -I -S {PACKAGE}/hooks/ssh_session.py
Subsystem sftp internal-sftp
PermitUserRC no
PermitUserEnvironment no
PermitRootLogin no
AllowTcpForwarding local
AllowStreamLocalForwarding no
X11Forwarding no
AllowAgentForwarding no
PermitTunnel no
"""
PAM = f"""\
@include common-auth
account required pam_nologin.so
@include common-account
@include common-session
session required pam_exec.so quiet stdout {sys.executable} -I -S {PACKAGE}/hooks/pam_hook.py
"""


def doctor(tmp_path: Path, sshd_config: str, *extra: str, pam_text: str = PAM) -> subprocess.CompletedProcess:
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {tmp_path / 'hostkey'}\n{sshd_config}")
    pam = tmp_path / "pam-sshd"
    pam.write_text(pam_text)
    ringfence_yaml = tmp_path / "ringfence.yaml"
    ringfence_yaml.write_text("")
    return subprocess.run([RINGFENCE, "doctor", "--sshd", SSHD, "--sshd-config", str(config), "--pam-file", str(pam),
                           "--config", str(ringfence_yaml), *extra], capture_output=True, text=True, timeout=60)


def holes(done: subprocess.CompletedProcess) -> list[tuple[str, str, str]]:
    report = json.loads(done.stdout)
    return sorted((f["setting"], f["value"], f["where"]) for f in report["findings"] if f["status"] == "HOLE")


def test_doctor_names_the_holes_of_a_real_sshd_config_and_those_a_match_block_opens(tmp_path):
    keygen(tmp_path / "hostkey")
    clean = doctor(tmp_path, GOOD, "--format", "json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert holes(clean) == []

    broken = GOOD.replace("AllowStreamLocalForwarding no", "AllowStreamLocalForwarding yes") + (
        "Match User alice,sftp-*\n    ForceCommand internal-sftp\n"
        "Match Address 10.9.0.0/16\n    AllowTcpForwarding yes\n")
    found = doctor(tmp_path, broken, "--format", "json")
    assert found.returncode == 1, found.stdout + found.stderr
    config = tmp_path / "sshd_config"
    assert holes(found) == [
        ("AllowStreamLocalForwarding", "yes", ""),
        ("AllowTcpForwarding", "yes, PermitListen any",
         f"Match Address 10.9.0.0/16 at {config}:16, probed with -C user=ringfence-doctor,host=doctor.invalid,"
         "addr=10.9.0.0"),
        ("ForceCommand", "internal-sftp",
         f"Match User alice,sftp-* at {config}:14, probed with -C user=alice,host=doctor.invalid,addr=192.0.2.1"),
    ]

    text = doctor(tmp_path, broken)
    assert text.returncode == 1
    assert ("HOLE  sshd AllowStreamLocalForwarding yes: a client can open any Unix socket on this host through "
            "sshd (ssh -L PORT:/path.sock), the enforcer's among them") in text.stdout
    assert f"Fix: AllowStreamLocalForwarding no in {config}, before any Match block" in text.stdout
    assert re.search(r"\n3 hole\(s\), \d+ warning\(s\)\n$", text.stdout)


def test_a_config_sshd_rejects_is_an_error_naming_it(tmp_path):
    keygen(tmp_path / "hostkey")
    done = doctor(tmp_path, GOOD + "AllowStreamLocalFrowarding no\n")
    assert done.returncode == 2
    assert "AllowStreamLocalFrowarding" in done.stderr and done.stdout == ""


def test_a_file_of_the_root_hook_that_another_user_can_change_is_a_hole(tmp_path):
    keygen(tmp_path / "hostkey")
    package = tmp_path / "install" / "ringfence"
    (package / "hooks").mkdir(parents=True)
    (package / "hooks" / "pam_hook.py").write_text("")
    planted = package / "hooks" / "__pycache__"
    planted.mkdir()
    tmp_path.chmod(0o755)
    pam_text = PAM.replace(str(PACKAGE), str(package))
    assert doctor(tmp_path, GOOD, "--format", "json", pam_text=pam_text).returncode == 0

    os.chown(planted, 65534, 65534)  # nobody could plant a .pyc the root hook loads
    found = doctor(tmp_path, GOOD, "--format", "json", pam_text=pam_text)
    assert found.returncode == 1
    assert [(f["setting"], f["value"], f["why"]) for f in json.loads(found.stdout)["findings"]
            if f["status"] == "HOLE"] == [
        ("PAM hook (runs as root)", str(planted), "owned by uid 65534: whoever can change it runs code in the hook")]


def test_debians_stock_files_with_the_shipped_examples_have_no_hole(tmp_path):
    """What the README tells an operator to do passes doctor: Debian's stock sshd_config and
    /etc/pam.d/sshd with the example drop-in and our PAM line where the README puts it."""
    from tests.support.sshd import stock_pam_with

    examples = PACKAGE.parent / "examples"
    hooks = subprocess.run([RINGFENCE, "hooks", "--data-dir", "/var/lib/ringfence"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    force = next(line for line in hooks if line.startswith("ForceCommand"))
    pam_line = next(line for line in hooks if line.startswith("session"))
    (tmp_path / "sshd_config.d").mkdir()
    drop_in = re.sub(r"^ForceCommand .*$", force, (examples / "sshd_config.d" / "ringfence.conf").read_text(),
                     flags=re.M)
    (tmp_path / "sshd_config.d" / "ringfence.conf").write_text(drop_in + "PermitRootLogin no\n")
    stock = Path("/etc/ssh/sshd_config").read_text()
    config = tmp_path / "sshd_config"
    config.write_text(re.sub(r"^Include /etc/ssh/sshd_config.d/\*\.conf$",
                             f"Include {tmp_path}/sshd_config.d/*.conf", stock, flags=re.M))
    pam = tmp_path / "pam-sshd"
    pam.write_text(stock_pam_with([pam_line]))
    result = subprocess.run([RINGFENCE, "doctor", "--sshd-config", str(config), "--pam-file", str(pam)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "HOLE" not in result.stdout, result.stdout + result.stderr
