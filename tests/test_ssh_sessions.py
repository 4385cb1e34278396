"""Real SSH sessions: sshd on a loopback port with the shipped config, the real ssh client."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.enforcer import policy, put_policy
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf

PROBE = (
    "python3 -c \"import socket; s=socket.socket(); s.settimeout(2)\n"
    "try: s.connect(('{host}',{port})); print('allowed')\n"
    "except ConnectionRefusedError: print('allowed')\n"
    "except OSError as e: print('errno', e.errno)\""
)


def cli(nats_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringfence.cli.main", *args, "--nats-url", nats_url],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def log_events(data_dir: Path) -> list[dict]:
    path = data_dir / "log" / "events.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events_of(data_dir: Path, sid: str, until: str = "session.end") -> list[dict]:
    def done():
        evs = [e for e in log_events(data_dir) if e["sid"] == sid]
        return evs if any(e["event"] == until for e in evs) else None

    return wait_for(done, timeout=30, what=f"{until} of session {sid} in events.log")


@pytest.fixture
def stack(nats_server, data_dir, services, enforcer, sshd):
    services("policy", "audit")
    node = enforcer()
    server = sshd(node)
    put_policy(nats_server.url, policy(["127.0.0.0/8", "::1"], ["127.0.0.5"]))
    wait_for(lambda: "1 allow / 1 deny" in node.log() or "2 allow / 1 deny" in node.log(), what="policy applied")
    return SimpleNamespace(url=nats_server.url, data_dir=data_dir, node=node, server=server)


def test_denied_connect_inside_ssh_is_eperm_and_audited_with_the_session(stack):
    login, key = stack.server.add_user()
    result = stack.server.ssh(login, key, "echo sid=$RINGFENCE_SESSION_ID; " + PROBE.format(host="127.0.0.5", port=9))
    assert result.returncode == 0, result.stderr
    sid = re.search(r"sid=(\S+)", result.stdout).group(1)
    assert "errno 1" in result.stdout  # EPERM
    events = events_of(stack.data_dir, sid)
    [net] = [e for e in events if e["event"] == "session.network"]
    assert (net["user"], net["login"], net["sid"], net["dst_addr"], net["action"]) == (login, login, sid,
                                                                                       "127.0.0.5", 1)
    start = events[0]
    assert start["event"] == "session.start" and start["kind"] == "channel"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", start["addr.remote"])
    assert start["addr.local"] == f"127.0.0.1:{stack.server.port}"
    # One login, one session: the connection writes no start/end of its own.
    mine = [e["event"] for e in log_events(stack.data_dir) if e["login"] == login]
    assert mine.count("session.start") == 1 and mine.count("session.end") == 1, mine
    [exec_event] = [e for e in events if e["event"] == "exec"]
    assert exec_event["code"] == "T3002I" and exec_event["exitCode"] == "0"
    assert exec_event["command"].startswith("echo sid=$RINGFENCE_SESSION_ID")


def test_identity_from_certificate_key_id_then_registered_key_then_login(nats_server, data_dir, services, enforcer,
                                                                         sshd, tmp_path):
    services("policy", "audit")
    trusted = tmp_path / "trusted_user_ca_keys"
    node = enforcer(config=f"ssh_service:\n  trusted_user_ca_keys: {trusted}\n")
    stack = SimpleNamespace(url=nats_server.url, server=sshd(node))
    trusted.write_text(Path(f"{stack.server.ca}.pub").read_text())
    login, key = stack.server.add_user()
    show = "echo user=$RINGFENCE_USER"
    assert "user=" + login in stack.server.ssh(login, key, show).stdout  # no cert, no registered key: the login

    added = cli(stack.url, "users", "add", "alice", "--roles", "dev", "--key", f"{key}.pub")
    assert added.returncode == 0, added.stderr
    wait_for(lambda: "user=alice" in stack.server.ssh(login, key, show).stdout, what="the registered key to count")

    cert = stack.server.certify(key, "alice@example.com", login)
    result = stack.server.ssh(login, key, show, "-o", f"CertificateFile={cert}")
    assert "user=alice@example.com" in result.stdout, result.stderr


def test_local_port_forwarding_is_restricted_like_the_session(stack):
    login, key = stack.server.add_user()
    denied = socket.create_server(("127.0.0.5", 0))
    allowed = socket.create_server(("127.0.0.1", 0))
    local_denied, local_allowed = free_port(), free_port()
    forwards = ["-L", f"{local_denied}:127.0.0.5:{denied.getsockname()[1]}",
                "-L", f"{local_allowed}:127.0.0.1:{allowed.getsockname()[1]}"]
    fwd = subprocess.Popen(stack.server.ssh_argv(login, key, "-N", *forwards))
    try:
        wait_for(lambda: _connectable(local_allowed), what="the forward to listen")
        for listener, port in ((denied, local_denied), (allowed, local_allowed)):
            listener.settimeout(3)
            with socket.create_connection(("127.0.0.1", port), timeout=3):
                pass
        allowed.settimeout(3)
        denied.settimeout(1)
        with pytest.raises(TimeoutError):
            denied.accept()  # the forwarded connection never reached 127.0.0.5
        conn, _ = allowed.accept()
        conn.close()
        denials = wait_for(lambda: [e for e in log_events(stack.data_dir) if e["event"] == "session.network"
                                    and e["dst_addr"] == "127.0.0.5"], what="the forward's denial in events.log")
        assert denials[0]["user"] == login and "sshd" in denials[0]["program"]
    finally:
        fwd.terminate()
        fwd.wait(10)
        denied.close()
        allowed.close()


def test_a_session_cannot_open_another_session(stack):
    login, key = stack.server.add_user()
    ringfence = Path(sys.executable).parent / "ringfence"
    run = f"{ringfence} run --data-dir {stack.node.data_dir}"
    result = stack.server.ssh(login, key, f"{run} -- true; {run} --user root --login root -- true")
    assert result.stderr.count("already in a session") == 2, result.stderr


def test_sftp_is_a_session(stack, tmp_path):
    login, key = stack.server.add_user()
    batch = tmp_path / "batch"
    batch.write_text("put /etc/hostname uploaded\nls\n")
    batch.chmod(0o644)
    result = subprocess.run(stack.server.sftp_argv(login, key, batch), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert Path(f"/home/{login}/uploaded").exists()
    starts = wait_for(lambda: [e for e in log_events(stack.data_dir) if e["event"] == "session.start"
                               and e["user"] == login], what="sftp session")
    assert starts[0]["kind"] == "channel" and starts[0]["initial_command"][0].endswith("sftp-server")
    # Each file operation is an `sftp` event (the original's), read by the root relay from the protocol.
    sid = starts[0]["sid"]
    events = events_of(stack.data_dir, sid)
    uploaded = f"/home/{login}/uploaded"
    closes = [e for e in events if e["event"] == "sftp" and e["code"] == "TS002I" and e["path"] == uploaded]
    assert closes and closes[0]["bytes_written"] == len(Path("/etc/hostname").read_bytes()), events
    assert any(e["event"] == "sftp" and e["code"] == "TS001I" and e["path"] == uploaded for e in events)
    assert closes[0]["working_directory"] == f"/home/{login}" and closes[0]["user"] == login


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Terminal:
    """The real ssh client on a pty, driven like a user at a keyboard."""

    def __init__(self, argv: list[str], env: dict | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(ROOT)
            os.execvpe(argv[0], argv, env if env is not None else os.environ)
        import fcntl
        import termios
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.output = b""

    def read_until(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {text!r}; got {self.output[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:
                    break
        return self.output.decode(errors="replace")

    def wait_match(self, pattern: str, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.output.decode(errors="replace"))):
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw /{pattern}/; got {self.output[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                self.output += os.read(self.fd, 65536)
        return m

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> int:
        try:
            _, status = os.waitpid(self.pid, 0)
        finally:
            os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_interactive_session_is_recorded_and_joinable_and_play_reproduces_it(stack):
    login, key = stack.server.add_user()
    term = Terminal([*stack.server.ssh_argv(login, key, "-tt")])
    term.read_until("$ ")
    term.type('echo "S""ID=$RINGFENCE_SESSION_ID"\n')  # split, so the echoed input does not match
    sid = term.wait_match(r"SID=([0-9a-f-]{36})").group(1)

    joined = subprocess.Popen([sys.executable, "-m", "ringfence.cli.main", "sessions", "join", sid,
                               "--nats-url", stack.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=ROOT)
    seen = b""

    def follow():
        nonlocal seen
        for chunk in iter(lambda: joined.stdout.read1(4096), b""):
            seen += chunk

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    wait_for(lambda: any(e["event"] == "session.join" for e in log_events(stack.data_dir) if e["sid"] == sid),
             what="session.join")
    term.type("echo live-$((6*7))\n")  # the input shows $((6*7)); only the output shows 42
    term.read_until("live-42")
    wait_for(lambda: b"live-42" in seen, what="join to show the live output")
    term.type("exit\n")
    assert term.close() == 0
    joined.wait(20)
    events = events_of(stack.data_dir, sid)
    assert "session.leave" in [e["event"] for e in events]

    def played():
        r = cli(stack.url, "play", sid, "--speed", "1000")
        return r.stdout if r.returncode == 0 and "live-42" in r.stdout else None

    output = wait_for(played, timeout=30, what="the recording to be playable")
    assert "SID=" + sid in output and output.index("SID=") < output.index("live-42")
    ended = cli(stack.url, "sessions", "ls", "--ended", "--format", "json")
    assert sid in ended.stdout


def test_enhanced_recording_of_an_ssh_session(nats_server, data_dir, services, enforcer, sshd):
    services("audit")
    node = enforcer(config="ssh_service:\n  enhanced_recording:\n    enabled: true\n")
    server = sshd(node)
    login, key = server.add_user()
    command = ("echo sid=$RINGFENCE_SESSION_ID; /bin/cat /etc/hostname; /usr/bin/head -c 3 /etc/os-release; echo; "
               "for i in $(seq 40); do /bin/cat /etc/hostname > /dev/null; done; "
               + PROBE.format(host="127.0.0.1", port=9))
    result = server.ssh(login, key, command)
    assert result.returncode == 0, result.stderr
    sid = re.search(r"sid=(\S+)", result.stdout).group(1)
    events = events_of(data_dir, sid)
    commands = [e for e in events if e["event"] == "session.command"]
    cat = next(e for e in commands if e["path"] == "/bin/cat")
    assert cat["argv"] == ["/etc/hostname"] and cat["return_code"] == 0 and cat["program"] == "cat"
    assert cat["code"] == "T4000I" and cat["user"] == login and cat["ppid"] > 0
    head = next(e for e in commands if e["path"] == "/usr/bin/head")
    assert head["argv"] == ["-c", "3", "/etc/os-release"]
    disk = [e for e in events if e["event"] == "session.disk"]
    opened = next(e for e in disk if e["path"] == "/etc/hostname" and e["program"] == "cat")
    assert opened["code"] == "T4001I" and opened["return_code"] >= 0 and opened["flags"] & 3 == 0  # O_RDONLY
    # The loop's repeats of that open are folded in the kernel: fewer lines, every open counted,
    # written before session.end with the session's user.
    hostname = [e for e in disk if e["path"] == "/etc/hostname" and e["program"] == "cat"]
    assert sum(e.get("count", 1) for e in hostname) == 41 and len(hostname) < 41
    assert all(e["user"] == login and e["sid"] == sid for e in hostname)
    assert [e["event"] for e in events].index("session.end") > events.index(hostname[-1])
    observed = [e for e in events if e["event"] == "session.network" and e["dst_port"] == 9]
    assert observed and observed[0]["action"] == 0 and observed[0]["dst_addr"] == "127.0.0.1"
    # Processes outside sessions are not recorded.
    assert not [e for e in log_events(data_dir) if e["event"] == "session.command" and not e["sid"]]


def test_sessions_ls_shows_the_fleet_and_kill_ends_a_session(stack):
    login, key = stack.server.add_user()
    term = Terminal(stack.server.ssh_argv(login, key, "-tt"))
    term.read_until("$ ")
    term.type('echo "S""ID=$RINGFENCE_SESSION_ID"\n')
    sid = term.wait_match(r"SID=([0-9a-f-]{36})").group(1)

    def listed():
        out = cli(stack.url, "sessions", "ls", "--format", "json").stdout
        return [s for s in json.loads(out or "[]") if s["sid"] == sid]

    [row] = wait_for(listed, what="the session in `sessions ls`")
    assert row["user"] == login and row["login"] == login and row["addr_remote"].startswith("127.0.0.1:")
    table = cli(stack.url, "sessions", "ls").stdout
    assert sid in table and "IDLE" in table

    killed = cli(stack.url, "sessions", "kill", sid, "--message", "maintenance window")
    assert killed.returncode == 0 and killed.stdout.strip() == f'session "{sid}" has been terminated'
    assert "maintenance window" in term.read_until("maintenance window")
    term.close()
    wait_for(lambda: not listed(), what="the session to leave `sessions ls`")
    missing = cli(stack.url, "sessions", "kill", sid)
    assert missing.returncode == 1 and "no active session" in missing.stderr


def test_losing_the_enforcer_mid_session_keeps_the_session_and_its_recording(stack):
    """The relay, not the enforcer, owns the session's I/O and journals it to disk: killing the
    enforcer (SIGKILL) changes nothing for the user, and the restarted enforcer picks up the
    journal where it stopped, so the recording and the audit trail have it all, once."""
    login, key = stack.server.add_user()
    term = Terminal(stack.server.ssh_argv(login, key, "-tt"))
    term.read_until("$ ")
    term.type('echo "S""ID=$RINGFENCE_SESSION_ID"\n')
    sid = term.wait_match(r"SID=([0-9a-f-]{36})").group(1)
    stack.node.kill()
    term.type("echo while-$((1+1))-down\n")
    term.read_until("while-2-down")
    stack.node.restart()
    term.type("echo back-$((2+1))-up\n")
    term.read_until("back-3-up")
    term.type("exit\n")
    assert term.close() == 0
    events = events_of(stack.data_dir, sid)
    assert [e["event"] for e in events].count("session.start") == 1
    assert [e["event"] for e in events].count("session.end") == 1

    def played():
        r = cli(stack.url, "play", sid, "--speed", "1000")
        return r.stdout if r.returncode == 0 and "back-3-up" in r.stdout else None

    output = wait_for(played, timeout=30, what="the recording to be playable")
    assert output.index("while-2-down") < output.index("back-3-up")


def test_motd_and_last_login_as_on_a_plain_sshd_and_none_for_refused_logins(stack, services):
    services("locks")
    login, key = stack.server.add_user()
    motd_line = next((line for line in Path("/etc/motd").read_text().splitlines() if line.strip()), "")
    first = Terminal(stack.server.ssh_argv(login, key, "-tt"))
    shown = first.read_until("$ ")
    assert motd_line in shown and "Last login" not in shown  # never logged in before
    first.type("exit\n")
    first.close()
    second = Terminal(stack.server.ssh_argv(login, key, "-tt"))
    shown = second.read_until("$ ")
    assert re.search(r"Last login: \w{3} \w{3} +\d+ [\d:]+ \d{4} from 127\.0\.0\.1", shown), shown
    assert shown.index(motd_line) < shown.index("Last login")
    second.type("touch ~/.hushlogin; exit\n")
    second.close()
    quiet = Terminal(stack.server.ssh_argv(login, key, "-tt"))
    assert "Last login" not in quiet.read_until("$ ") and motd_line not in quiet.output.decode()
    quiet.type("exit\n")
    quiet.close()
    # A command prints neither (as on a plain sshd), and a refused login shows only why.
    assert motd_line not in stack.server.ssh(login, key, "true").stdout
    assert cli(stack.url, "lock", "--login", login, "--message", "maintenance").returncode == 0
    refused = wait_for(lambda: (r := stack.server.ssh(login, key, "echo ran-$((1+1))")).returncode != 0 and r,
                       what="the lock to refuse the login")
    said = refused.stdout + refused.stderr  # sshd prints PAM's messages on the session's stdout
    assert 'lock targeting Login:"' in said and "maintenance" in said and motd_line not in said
    assert "ran-2" not in said  # and runs nothing
