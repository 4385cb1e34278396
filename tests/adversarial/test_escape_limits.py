"""Attack 4 (issue 11) and issue 13: escape recording and the idle timeout.

On main the user's own wrapper owned the terminal: `ssh -T host 'script -q -c
bash /dev/null'` was an interactive shell that was never recorded and never
timed out, `ssh -N -L` tunnels never idled out, output (a background printf)
kept a session "active", and one idle channel ended its multiplexed siblings.
Now a root relay records every channel and times out each on the client's
input only; a connection with no channel idles out on its forwards' input.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.adversarial.conftest import cli, log_events
from tests.support.procs import wait_for
from tests.test_ssh_sessions import Terminal, _connectable, free_port

pytestmark = pytest.mark.bpf

MESSAGE = "Client exceeded idle timeout of 2s"


def idle_timeout(hostile, value: str = "2s") -> None:
    doc = hostile.tmp / "networking.yaml"
    doc.write_text("kind: cluster_networking_config\nversion: v2\nmetadata:\n"
                   f"  name: cluster-networking-config\nspec:\n  client_idle_timeout: {value}\n")
    assert cli(hostile.url, "create", "-f", str(doc)).returncode == 0
    wait_for(lambda: f"cluster client_idle_timeout: {value}" in hostile.node.log(), what="the timeout to apply")


def test_a_shell_inside_ssh_T_is_recorded(hostile):
    login, key = hostile.server.add_user()
    result = subprocess.run([*hostile.server.ssh_argv(login, key, "-T"), "script -q -c bash /dev/null"],
                            input='echo "S""ID=$RINGFENCE_SESSION_ID"\necho secret-$((6*7))\nexit\n',
                            capture_output=True, text=True, timeout=60)
    sid = re.search(r"SID=([0-9a-f-]{36})", result.stdout).group(1)  # script's pty echoes the input too
    assert "secret-42" in result.stdout

    def played():
        r = cli(hostile.url, "play", sid, "--speed", "1000")
        return r.stdout if r.returncode == 0 and "secret-42" in r.stdout else None

    wait_for(played, timeout=30, what="the recording of the ssh -T shell")
    # The cast file is asciicast v2 as asciinema itself reads it.
    cast = hostile.tmp / "shell.cast"
    cast.write_text(cli(hostile.url, "play", sid, "--format", "cast").stdout)
    shown = subprocess.run([sys.executable, "-m", "asciinema", "cat", str(cast)], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0 and "secret-42" in shown.stdout, shown.stderr


def test_ssh_N_tunnels_idle_out_unless_the_client_sends(hostile):
    idle_timeout(hostile)
    login, key = hostile.server.add_user()
    target = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(target.accept()[0]), daemon=True).start()

    busy_port = free_port()
    busy = subprocess.Popen(hostile.server.ssh_argv(login, key, "-N", "-L",
                                                    f"{busy_port}:127.0.0.1:{target.getsockname()[1]}"))
    idle = subprocess.Popen(hostile.server.ssh_argv(login, key, "-N", "-L", f"{free_port()}:127.0.0.1:9"))
    try:
        wait_for(lambda: _connectable(busy_port), what="the tunnel")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", busy_port)) as through:
            while time.monotonic() - started < 6:
                through.sendall(b"keystroke\n")  # the client's input, forwarded: activity
                time.sleep(0.5)
            assert busy.poll() is None, "a tunnel the client is using was cut"
        idle.wait(10)  # the idle tunnel ended on its own
        assert time.monotonic() - started < 10
    finally:
        for p in (busy, idle):
            p.kill()
        target.close()
    wait_for(lambda: [e for e in log_events(hostile.data_dir) if e["event"] == "client.disconnect"
                      and e["reason"] == MESSAGE and e["login"] == login], what="client.disconnect")


def test_output_does_not_keep_a_session_alive(hostile):
    idle_timeout(hostile)
    login, key = hostile.server.add_user()
    term = Terminal(hostile.server.ssh_argv(login, key, "-tt"))
    term.read_until("$ ")
    term.type("while true; do printf .; sleep 0.3; done\n")
    started = time.monotonic()
    term.read_until(MESSAGE, timeout=15)
    assert time.monotonic() - started < 8
    term.close()


def test_one_idle_channel_does_not_end_its_active_sibling(hostile):
    idle_timeout(hostile, "3s")
    login, key = hostile.server.add_user()
    control = hostile.tmp / "cm.sock"
    mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}", "-o", "ControlPersist=60"]
    master = subprocess.Popen(hostile.server.ssh_argv(login, key, *mux, "-N"))
    try:
        wait_for(control.exists, what="the control master")
        active = Terminal(hostile.server.ssh_argv(login, key, *mux, "-tt"))
        idle = Terminal(hostile.server.ssh_argv(login, key, *mux, "-tt"))
        active.read_until("$ ")
        idle.read_until("$ ")
        for i in range(10):  # 5 s of typing on one channel while the other sits idle
            active.type(f"echo tick{i}\n")
            active.read_until(f"tick{i}\r\n")
            time.sleep(0.5)
        assert MESSAGE.replace("2s", "3s") in idle.read_until("idle timeout", timeout=5)
        active.type("echo still-here\n")
        active.read_until("still-here\r\n")
        active.type("exit\n")
        assert active.close() == 0
        idle.close()
    finally:
        subprocess.run(["ssh", "-o", f"ControlPath={control}", "-O", "exit", "x"], capture_output=True)
        master.kill()


def test_the_user_cannot_signal_or_trace_the_relay(hostile):
    """On main the recorder was the user's own process: `kill` or ptrace stopped the recording.
    The relay that runs the session's program is root's and outside the session."""
    login, key = hostile.server.add_user()
    # $PPID is the shell's parent: the relay.
    probe = ("python3 -c \"import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
             "r = libc.ptrace(16, int(sys.argv[1]), 0, 0); print('ptrace', r, ctypes.get_errno())\" $PPID; "
             "kill -9 $PPID; echo kill=$?; echo still-recorded-$((6*7))")
    result = hostile.server.ssh(login, key, probe)
    assert "ptrace -1 1" in result.stdout  # PTRACE_ATTACH: EPERM
    assert "kill=1" in result.stdout and "still-recorded-42" in result.stdout, (result.stdout, result.stderr)
    sid = wait_for(lambda: [e["sid"] for e in log_events(hostile.data_dir) if e["event"] == "exec"
                            and e["login"] == login], what="the exec event")[0]
    wait_for(lambda: "still-recorded-42" in cli(hostile.url, "play", sid, "--speed", "1000").stdout,
             what="the recording to have it all")


def test_a_process_left_by_bashrc_cannot_use_the_terminal_behind_the_relays_back(hostile):
    """~/.bashrc runs before the wrapper with sshd's terminal: a process it leaves behind could
    write to (and read from) it unrecorded. The relay takes the terminal over: the device becomes
    root's and every other open file of it is hung up."""
    login, key = hostile.server.add_user()
    from tests.adversarial.conftest import as_user
    # Only in the non-interactive shell sshd runs the wrapper with (the session's own login shell
    # reads ~/.bashrc too, and its jobs are the session's, recorded).
    as_user(login, ".bashrc", "case $- in *i*) return;; esac\n"
            "(sleep 3; echo UNRECORDED-$((1+1)) >&2; echo wrote=$? > /tmp/" + login + ".bg) &\n")
    term = Terminal(hostile.server.ssh_argv(login, key, "-tt"))
    term.read_until("$ ")
    wait_for(lambda: os.path.exists(f"/tmp/{login}.bg"), timeout=15, what="the background writer")
    term.type("echo done-$((3+4))\n")
    shown = term.read_until("done-7")
    term.type("exit\n")
    term.close()
    assert "UNRECORDED-2" not in shown
    assert Path(f"/tmp/{login}.bg").read_text().strip() != "wrote=0"
    os.unlink(f"/tmp/{login}.bg")
