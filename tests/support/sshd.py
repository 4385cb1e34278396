"""A real OpenSSH server on a loopback port, wired to an enforcer as the README says.

sshd takes its PAM service name from the name it was started as, so it is
started through a symlink with a unique name and gets its own /etc/pam.d file
(removed afterwards). Test users are real accounts (removed afterwards).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .nats import free_port
from .procs import wait_for

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
VENV_BIN = Path(sys.executable).parent
RINGFENCE = str(VENV_BIN / "ringfence")
HOOKS = Path(__file__).resolve().parents[2] / "ringfence" / "hooks"
PYTHON = os.path.realpath(sys.executable)
STOCK_PAM = Path("/etc/pam.d/sshd")


def stock_pam_with(ours: list[str]) -> str:
    """Debian's /etc/pam.d/sshd with our line right after common-session (before pam_env)."""
    [line] = ours
    out = []
    for stock in STOCK_PAM.read_text().splitlines():
        out.append(stock)
        if stock.strip() == "@include common-session":
            out.append(line)
    assert line in out, "the stock PAM file lacks @include common-session"
    return "\n".join(out) + "\n"


def keygen(path: Path, comment: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path


class SshServer:
    def __init__(self, workdir: Path, data_dir: Path, *, forwarding: bool = True, extra_config: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.data_dir = data_dir
        self.port = free_port()
        self.service = f"rfsshd{uuid.uuid4().hex[:8]}"
        self.pam_file = Path("/etc/pam.d") / self.service
        self.forwarding = forwarding
        self.extra_config = extra_config  # sshd lines that win over the example's (first match wins)
        self.proc: subprocess.Popen | None = None
        self.users: list[str] = []
        self.ca = keygen(self.dir / "ca", "ringfence-test-ca")

    def add_user(self, prefix: str = "u") -> tuple[str, Path]:
        """A real account that logs in with a fresh key; returns (login, private key path)."""
        login = f"rf{prefix}{uuid.uuid4().hex[:6]}"
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", login], check=True)
        self.users.append(login)
        key = keygen(self.dir / f"{login}_key", login)
        ssh_dir = Path(f"/home/{login}/.ssh")
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        shutil.chown(ssh_dir, login, login)
        shutil.chown(ssh_dir / "authorized_keys", login, login)
        return login, key

    def certify(self, key: Path, key_id: str, login: str) -> Path:
        """Sign `key` with the test CA: the certificate's key ID names the Ringfence user."""
        subprocess.run(["ssh-keygen", "-q", "-s", str(self.ca), "-I", key_id, "-n", login, f"{key}.pub"],
                       check=True)
        return Path(f"{key}-cert.pub")

    def start(self) -> SshServer:
        hostkey = keygen(self.dir / "hostkey")
        examples = Path(__file__).resolve().parents[2] / "examples"
        # Debian's stock /etc/pam.d/sshd with the shipped lines where the README puts them.
        ours = [line.replace("/opt/ringfence/ringfence/hooks", str(HOOKS)).replace("/usr/bin/python3", PYTHON)
                .replace("/var/lib/ringfence", str(self.data_dir))
                for line in (examples / "pam.d" / "sshd.lines").read_text().splitlines()
                if line and not line.startswith("#")]
        self.pam_file.write_text(stock_pam_with(ours))
        config = self.dir / "sshd_config"
        example = (examples / "sshd_config.d" / "ringfence.conf").read_text()
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nPidFile {self.dir}/sshd.pid\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"TrustedUserCAKeys {self.ca}.pub\nStrictModes no\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
            + ("AllowTcpForwarding yes\n" if self.forwarding else "") + self.extra_config
            + example.replace("/opt/ringfence/ringfence/hooks", str(HOOKS)).replace("/usr/bin/python3", PYTHON)
            .replace("/var/lib/ringfence", str(self.data_dir))
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        link = self.dir / self.service
        link.symlink_to(SSHD)
        self.log = self.dir / "sshd.log"
        self.proc = subprocess.Popen([str(link), "-D", "-e", "-f", str(config)], stdout=open(self.log, "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: "Server listening" in self.log.read_text(), 10, what="sshd to listen")
        return self

    def ssh_argv(self, login: str, key: Path, *extra: str) -> list[str]:
        return ["ssh", "-i", str(key), "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                *extra, f"{login}@127.0.0.1"]

    def sftp_argv(self, login: str, key: Path, batch: Path) -> list[str]:
        return ["sftp", "-b", str(batch), "-i", str(key), "-P", str(self.port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{login}@127.0.0.1"]

    def ssh(self, login: str, key: Path, command: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.ssh_argv(login, key, *extra), command], capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
        for login in self.users:
            subprocess.run(["pkill", "-KILL", "-u", login], check=False)
        time.sleep(0.2)
        for login in self.users:
            subprocess.run(["userdel", "-r", "-f", login], capture_output=True, check=False)
        self.pam_file.unlink(missing_ok=True)
