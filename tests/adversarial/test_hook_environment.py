"""Attack 1 (issue 11): the user's ~/.pam_environment reaches the root PAM hook.

Debian's stock /etc/pam.d/sshd reads it (pam_env user_readenv=1), and pam_exec
hands the PAM environment to the program it runs. On main the hook was the full
`ringfence` CLI appended after pam_env: PYTHONPATH ran the user's sitecustomize.py
as root, and RINGFENCE_DATA_DIR pointed it at a socket the user served (no
cgroup, no restrictions, no session.start). Now the hook sits before pam_env and
runs isolated (python3 -I -S), and only talks to a root peer.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.adversarial.conftest import DENIED, as_user, log_events
from tests.support.procs import wait_for

pytestmark = pytest.mark.bpf

PROBE = ("python3 -c \"import socket; s=socket.socket(); s.settimeout(2)\n"
         "try: s.connect(('{host}',9)); print('allowed')\n"
         "except ConnectionRefusedError: print('allowed')\n"
         "except OSError as e: print('errno', e.errno)\"")

PRELOAD = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void owned(void) {
    if (geteuid() == 0) { FILE *f = fopen("MARKER", "w"); if (f) { fputs("root\n", f); fclose(f); } }
}
"""


def test_pam_environment_cannot_run_code_as_root_or_move_the_enforcer(hostile, tmp_path):
    login, key = hostile.server.add_user()
    home = f"/home/{login}"
    marker = tmp_path / "owned-as-root"
    as_user(login, "x/sitecustomize.py",
            f"import os\nif os.geteuid() == 0:\n    open({str(marker)!r}, 'w').write('root')\n")
    source = as_user(login, "evil.c", PRELOAD.replace("MARKER", str(marker)))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", f"{home}/evil.so", str(source)], check=True)
    fake = f"{home}/fake"
    as_user(login, ".pam_environment",
            f"PYTHONPATH DEFAULT={home}/x\nLD_PRELOAD DEFAULT={home}/evil.so\nRINGFENCE_DATA_DIR DEFAULT={fake}\n"
            f"PYTHONSTARTUP DEFAULT={home}/x/sitecustomize.py\n")
    # A socket the user serves where RINGFENCE_DATA_DIR points: it must never be asked.
    server = subprocess.Popen(["su", "-s", "/bin/sh", login, "-c",
                               f"mkdir -p {fake} && python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); "
                               f"s.bind('{fake}/enforcer.sock'); s.listen(); c,_=s.accept(); "
                               f"open('{fake}/asked','w').write('asked')\""])
    try:
        result = hostile.server.ssh(login, key, "echo sid=$RINGFENCE_SESSION_ID; cat /proc/self/cgroup; "
                                    + PROBE.format(host=DENIED))
    finally:
        server.kill()
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "the user's code ran as root"
    assert "errno 1" in result.stdout, result.stdout  # restricted: EPERM for the denied address
    assert f"/ringfence/{hostile.node.nodename}/" in result.stdout  # in our cgroup
    sid = re.search(r"sid=(\S+)", result.stdout).group(1)
    wait_for(lambda: any(e["event"] == "session.start" and e["sid"] == sid for e in log_events(hostile.data_dir)),
             what="session.start")
    assert not (tmp_path / "asked").exists() and not __import__("os").path.exists(f"{fake}/asked")


def test_hooks_refuse_an_enforcer_socket_not_served_by_root(hostile, tmp_path):
    """The wrapper is the user's own process: pointed at a socket the user serves, it refuses it
    rather than hand the terminal to it."""
    login, key = hostile.server.add_user()
    from tests.support.sshd import HOOKS, PYTHON
    fake = f"/home/{login}/fake.sock"
    cmd = (f"python3 -c \"import socket,threading; s=socket.socket(socket.AF_UNIX); s.bind('{fake}'); s.listen(); "
           f"threading.Thread(target=lambda: s.accept(), daemon=True).start(); import subprocess; "
           f"r=subprocess.run(['{PYTHON}','-I','-S','{HOOKS}/ssh_session.py','--socket','{fake}']); "
           f"print('rc', r.returncode)\"")
    result = hostile.server.ssh(login, key, cmd)
    assert "not root; refusing to use it" in result.stderr and "rc 1" in result.stdout, (result.stdout, result.stderr)
