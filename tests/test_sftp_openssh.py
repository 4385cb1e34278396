"""The sftp auditor against real OpenSSH (issue 13): the real `sftp` client talks to the real
sftp-server through a tee that feeds the auditor as the root relay will (`python3 -I -S`,
standard library only); the operations it reports are the ones the client performed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringfence.contract import events
from ringfence.hooks import sftp_audit

TEE = Path(__file__).parent / "support" / "sftp_tee.py"
OPENSSH = shutil.which("sftp") and Path("/usr/lib/openssh/sftp-server").exists()

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not OPENSSH, reason="needs the OpenSSH sftp client and sftp-server")]

BATCH = """\
put local.bin up.bin
get up.bin down.bin
rename up.bin moved.bin
mkdir sub
ln -s moved.bin link
chmod 600 moved.bin
cp moved.bin copy.bin
ls
rm moved.bin
-rm missing.bin
rmdir sub
"""


def test_real_sftp_session_is_audited_with_paths_outcomes_and_bytes(tmp_path):
    size = 300_000  # ten 32 KiB writes and reads, pipelined by the client
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(size))
    local.chmod(0o640)
    (tmp_path / "batch").write_text(BATCH)
    out = tmp_path / "audit.jsonl"
    tee = f"{sys.executable} -I -S {TEE} {sftp_audit.__file__} {out}"
    run = subprocess.run(["sftp", "-b", "batch", "-D", tee], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "down.bin").read_bytes() == local.read_bytes()

    *lines, summary = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary == {"counters": {**dict.fromkeys(summary["counters"], 0), "unmeasured_copies": 1}, "stopped": {}}
    d = os.path.realpath(tmp_path)
    got = [(op["action"], op["path"].replace(d, "~"), op["target_path"].replace(d, "~"), op["status"], op["error"],
            op["bytes_read"], op["bytes_written"], op["bytes_exact"], op["attributes"]) for op in lines]
    rw_new = 0x2 | 0x8 | 0x10  # SSH_FXF_WRITE | CREAT | TRUNC
    assert got == [
        (1, "~/up.bin", "", 0, "", 0, 0, True, {"permissions": 0o640}),  # put
        (2, "~/up.bin", "", 0, "", 0, size, True, None),
        (1, "~/up.bin", "", 0, "", 0, 0, True, None),  # get
        (2, "~/up.bin", "", 0, "", size, 0, True, None),
        (16, "~/up.bin", "~/moved.bin", 0, "", 0, 0, True, None),  # rename (posix-rename@openssh.com)
        (12, "~/sub", "", 0, "", 0, 0, True, {"permissions": 0o777}),
        (18, "moved.bin", "~/link", 0, "", 0, 0, True, None),  # ln -s: the link's target as given, the link
        (7, "~/moved.bin", "", 0, "", 0, 0, True, {"permissions": 0o600}),  # chmod
        (1, "~/moved.bin", "", 0, "", 0, 0, True, None),  # cp: copy-data to end of file inside the server
        (1, "~/copy.bin", "", 0, "", 0, 0, True, {"permissions": 0o600}),
        (2, "~/moved.bin", "", 0, "", 0, 0, False, None),
        (2, "~/copy.bin", "", 0, "", 0, 0, False, None),
        (10, "~", "", 0, "", 0, 0, True, None),  # ls
        (11, "~/moved.bin", "", 0, "", 0, 0, True, None),
        (11, "~/missing.bin", "", 2, "No such file", 0, 0, True, None),
        (13, "~/sub", "", 0, "", 0, 0, True, None),
    ]
    assert [op["flags"] for op in lines if op["action"] == 1] == [rw_new, 1, 1, rw_new]
    codes = [events.SFTP(**op, sid="s-1", login="u", working_directory=d).code for op in lines]
    assert codes[0] == "TS001I" and codes[-2] == "TS011E" and codes[-1] == "TS013I"


def test_a_request_sftp_server_would_read_past_its_length_is_flagged_before_it_is_forwarded(tmp_path):
    """A remove whose declared length ends before its path: sftp-server reads the path from the
    bytes that follow, removes the file and exits without answering. The auditor reports it from
    the chunk that carries it, so the relay can refuse that chunk."""
    victim = tmp_path / "victim"
    victim.touch()
    path = str(victim).encode()
    chunk = (5).to_bytes(4, "big") + b"\x01" + (3).to_bytes(4, "big")  # INIT, version 3
    chunk += (5).to_bytes(4, "big") + b"\x0d" + (1).to_bytes(4, "big") + len(path).to_bytes(4, "big") + path
    auditor = sftp_audit.SftpAuditor()
    ops = auditor.feed_request(chunk)
    assert "client" in auditor.stopped
    assert [op["action"] for op in ops] == [0] and "remove request at byte 9" in ops[0]["error"]

    server = subprocess.Popen(["/usr/lib/openssh/sftp-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    server.stdin.write(chunk)  # what a relay that forwarded it anyway would cause
    server.stdin.flush()
    assert server.wait(timeout=10) == 255
    server.stdin.close()
    assert not victim.exists()
    replies = server.stdout.read()
    assert replies[4] == sftp_audit.VERSION and len(replies) == 4 + int.from_bytes(replies[:4], "big")  # no answer


def test_fsetstat_after_a_pipelined_close_and_open_names_the_file_sftp_server_changed(tmp_path):
    """sftp-server gives a freed handle to the next open, so a client that pipelines close,
    open and fsetstat changes the second file through the first file's handle."""
    old, secret = tmp_path / "old", tmp_path / "secret"
    old.touch(mode=0o600)
    secret.touch(mode=0o600)

    def u32(v: int) -> bytes:
        return v.to_bytes(4, "big")

    def pkt(kind: int, *parts: bytes) -> bytes:
        body = bytes([kind]) + b"".join(parts)
        return u32(len(body)) + body

    def s(b: bytes) -> bytes:
        return u32(len(b)) + b

    server = subprocess.Popen(["/usr/lib/openssh/sftp-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    auditor = sftp_audit.SftpAuditor()
    ops = []

    def send(data: bytes, replies: int) -> bytes:
        ops.extend(auditor.feed_request(data))
        server.stdin.write(data)
        server.stdin.flush()
        got = b""
        for _ in range(replies):
            head = server.stdout.read(4)
            got += head + server.stdout.read(int.from_bytes(head, "big"))
        ops.extend(auditor.feed_response(got))
        return got

    send(pkt(sftp_audit.INIT, u32(3)), 1)
    reply = send(pkt(sftp_audit.OPEN, u32(1), s(str(old).encode()), u32(1), u32(0)), 1)
    handle = reply[13:]  # length, HANDLE, id, handle's length, handle
    send(pkt(sftp_audit.CLOSE, u32(2), s(handle))
         + pkt(sftp_audit.OPEN, u32(3), s(str(secret).encode()), u32(1), u32(0))
         + pkt(sftp_audit.FSETSTAT, u32(4), s(handle), u32(sftp_audit.ATTR_PERMISSIONS), u32(0o777)), 3)
    server.stdin.close()
    server.wait(timeout=10)
    ops += auditor.finish()

    assert (secret.stat().st_mode & 0o777, old.stat().st_mode & 0o777) == (0o777, 0o600)
    assert [(op["action"], op["path"], op["status"]) for op in ops] == [
        (1, str(old), 0), (2, str(old), 0), (1, str(secret), 0),
        (8, str(secret), 0),  # the file sftp-server changed
        (2, str(secret), None),  # never closed
    ]
