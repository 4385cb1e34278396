"""Enhanced recording (session.command, session.disk): record parsing and event
conversion, then the BPF programs for real: a temporary session cgroup, the
restricted-session maps (they own the shared `sessions` map) and the
recording programs pinned next to them."""

from __future__ import annotations

import dataclasses
import errno
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ringfence.contract.api import SessionInfo
from ringfence.contract.events import SessionCommand, SessionDisk, encode_event
from services.enforcer import kernel
from services.enforcer.cgroups import CgroupTree
from services.enforcer.disk_folds import FOLD_INTERVAL
from services.enforcer.recording_bpf import (
    DISK_HEADER,
    EXEC_HEADER,
    MAX_ARGS,
    TRUNC_ARGS,
    TRUNC_PATH,
    RecordingBPF,
    btf_member_offsets,
    parse_disk,
    parse_exec,
)
from services.enforcer.recording_events import CommandRecord, DiskRecord, command_event, disk_event
from services.enforcer.restricted_bpf import SESSION_RECORDED, SESSION_RESTRICTED, RestrictedBPF
from services.enforcer.uninstall import uninstall
from tests.support.procs import wait_for

SESSION = SessionInfo(sid="sid-1", user="alice", login="root", server_id="srv-1", server_hostname="node-1",
                      started="2026-01-01T00:00:00.000Z", cluster_name="cluster-a", cgroup_id=42)


# --- pure: records and events ------------------------------------------------------------
def exec_bytes(path: bytes, args: list[bytes], *, ret=0, truncated=0, args_trunc=0, boot_ns=2_000_000_000,
               comm=b"cat", pid=10, ppid=9, cgroup_id=42) -> bytes:
    path_part = path + b"\0"
    args_part = b"".join(a + b"\0" for a in args)
    header = EXEC_HEADER.pack(boot_ns, cgroup_id, pid, ppid, ret, args_trunc, len(path_part), len(args_part),
                              len(args), truncated, comm)
    return header + path_part + args_part


def test_parse_exec_reads_path_argv_and_flags():
    raw = exec_bytes(b"/bin/cat", [b"/bin/cat", b"x" * 127, b"\xff-not-utf8"], ret=-2,
                     truncated=TRUNC_ARGS | TRUNC_PATH, args_trunc=0b10, comm=b"cat\0\0\0")
    rec = parse_exec(raw, offset=1000.0)
    assert rec == CommandRecord(boot_ns=2_000_000_000, wall_time=1002.0, cgroup_id=42, pid=10, ppid=9,
                                comm="cat", path="/bin/cat", argv=("/bin/cat", "x" * 127, "\\xff-not-utf8"),
                                return_code=-2, path_truncated=True, args_missing=True, truncated_args=frozenset({1}))


def test_parse_exec_of_an_unreadable_path_and_no_arguments():
    rec = parse_exec(EXEC_HEADER.pack(0, 1, 2, 3, -14, 0, 0, 0, 0, 0, b"sh"), offset=0.0)
    assert (rec.path, rec.argv, rec.return_code, rec.comm) == ("", (), -14, "sh")


def test_parse_disk():
    raw = DISK_HEADER.pack(3_500_000_000, 42, 7, os.O_WRONLY | os.O_CREAT, 3, 5, 0, b"touch") + b"/tmp\0"
    assert parse_disk(raw, offset=10.0) == DiskRecord(boot_ns=3_500_000_000, wall_time=13.5, cgroup_id=42, pid=7,
                                                       comm="touch", path="/tmp", flags=os.O_WRONLY | os.O_CREAT,
                                                       return_code=3)


def test_command_event_drops_argv0_marks_truncation_and_attributes_the_session():
    rec = CommandRecord(boot_ns=5, wall_time=1626992654.984, cgroup_id=42, pid=10, ppid=9, comm="ping",
                        path="/bin/ping", argv=("ping", "-c1", "a" * 127), return_code=0, args_missing=True,
                        truncated_args=frozenset({2}))
    ev = command_event(rec, SESSION)
    assert isinstance(ev, SessionCommand) and ev.code == "T4000I"
    assert ev.time == "2021-07-22T22:24:14.984Z"
    assert (ev.pid, ev.ppid, ev.cgroup_id, ev.program, ev.path) == (10, 9, 42, "ping", "/bin/ping")
    assert ev.argv == ["-c1", "a" * 127 + "...", "..."]
    assert (ev.sid, ev.user, ev.login, ev.cluster_name, ev.server_id, ev.server_hostname) == (
        "sid-1", "alice", "root", "cluster-a", "srv-1", "node-1")
    # The same record read twice (after a crash) gets the same uid; another record does not.
    assert command_event(rec, SESSION).uid == ev.uid
    assert command_event(dataclasses.replace(rec, boot_ns=6), SESSION).uid != ev.uid


def test_command_event_without_session_and_with_a_cut_path():
    rec = CommandRecord(boot_ns=5, wall_time=0.0, cgroup_id=5, pid=1, ppid=0, comm="sh", path="/very/long",
                        argv=(), return_code=-2, path_truncated=True)
    ev = command_event(rec, None)
    assert (ev.path, ev.argv, ev.return_code, ev.sid, ev.user) == ("/very/long...", [], -2, "", "")


def test_disk_event():
    rec = DiskRecord(boot_ns=5, wall_time=1626992654.5, cgroup_id=42, pid=7, comm="cat", path="/etc/hostname", flags=0,
                     return_code=3)
    ev = disk_event(rec, SESSION)
    assert isinstance(ev, SessionDisk) and ev.code == "T4001I"
    assert (ev.time, ev.pid, ev.cgroup_id, ev.program, ev.path, ev.flags, ev.return_code) == (
        "2021-07-22T22:24:14.500Z", 7, 42, "cat", "/etc/hostname", 0, 3)
    assert ev.sid == "sid-1" and ev.server_hostname == "node-1"
    assert disk_event(rec, None).uid == ev.uid
    assert disk_event(dataclasses.replace(rec, return_code=4), None).uid != ev.uid
    cut = DiskRecord(0, 0.0, 1, 1, "x", "p" * 10, 0, -2, path_truncated=True)
    assert disk_event(cut, None).path == "p" * 10 + "..."
    assert b'"count"' not in encode_event(ev)  # one open: the event has the usual fields only


def test_disk_event_of_folded_repeats_says_how_many_and_since_when():
    rec = DiskRecord(boot_ns=9, wall_time=1626992655.25, cgroup_id=42, pid=8, comm="cat", path="/etc/hostname",
                     flags=0, return_code=3, repeats=1499, first_boot_ns=6, first_wall_time=1626992654.75)
    ev = disk_event(rec, SESSION)
    assert (ev.count, ev.first_time, ev.time, ev.pid) == (1499, "2021-07-22T22:24:14.750Z",
                                                          "2021-07-22T22:24:15.250Z", 8)
    assert ev.sid == "sid-1" and rec.opens == 1499
    single = dataclasses.replace(rec, repeats=0, first_boot_ns=0, first_wall_time=0.0)
    assert disk_event(single, None).uid != ev.uid  # a summary never collides with the open it follows
    assert disk_event(dataclasses.replace(rec, repeats=1500), None).uid != ev.uid


@pytest.mark.skipif(not Path("/sys/kernel/btf/vmlinux").exists(), reason="kernel without BTF")
def test_task_struct_offsets_from_btf():
    off = btf_member_offsets("task_struct", ("pid", "tgid", "real_parent"))
    assert off["tgid"] == off["pid"] + 4  # pid_t pid; pid_t tgid; in every kernel
    assert off["real_parent"] > off["tgid"]
    with pytest.raises(ValueError):
        btf_member_offsets("task_struct", ("no_such_member",))


# --- real BPF ------------------------------------------------------------------------------
class Rig:
    """A node's pinned maps, one recorded session cgroup and the recording programs."""

    def __init__(self, ringbuf_bytes: int) -> None:
        self.nodename = f"t{uuid.uuid4().hex[:10]}"
        self.ringbuf_bytes = ringbuf_bytes
        self.tree = CgroupTree(kernel.find_cgroup2(), self.nodename)
        self.pins = kernel.ensure_bpffs() / "ringfence" / self.nodename
        self.restricted: RestrictedBPF | None = None
        self.rec: RecordingBPF | None = None
        self.commands: list[CommandRecord] = []
        self.disks: list[DiskRecord] = []
        try:
            self.restricted = RestrictedBPF(self.pins, 1 << 16)
            self.rec = RecordingBPF(self.pins, ringbuf_bytes)
            self.cgid = self.session("rec", SESSION_RECORDED)
        except BaseException:
            self.close()
            raise

    def session(self, sid: str, flags: int | None) -> int:
        cgid = self.tree.create(sid)
        if flags is not None:
            self.restricted.add_session(cgid, flags)
        return cgid

    def start_reader(self) -> None:
        self.rec.start_reader(self.commands.extend, self.disks.extend)

    def run(self, *cmd: str, sid: str = "rec") -> subprocess.CompletedProcess:
        """Run `cmd` in session `sid`: the shell moves itself into the cgroup, then execs it."""
        procs = self.tree.path(sid) / "cgroup.procs"
        return subprocess.run(["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *cmd],
                              capture_output=True, text=True, timeout=60)

    def settle(self) -> None:
        """Everything emitted so far has reached the callbacks, folded repeats included."""
        self.rec.request_folds()
        target = self.rec.reader_cycles + 2
        wait_for(lambda: self.rec.reader_cycles >= target, 5, what="the ring-buffer reader")

    def commands_of(self, pid: int) -> list[CommandRecord]:
        return [c for c in self.commands if c.pid == pid]

    def close(self) -> None:
        if self.rec:
            self.rec.close()
        if self.restricted:
            self.restricted.close()
        sids = self.tree.existing()
        for sid in sids:
            self.tree.kill(sid)
        deadline = time.monotonic() + 5
        while any(self.tree.populated(s) for s in sids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for sid in sids:
            self.tree.remove(sid)
        uninstall(self.nodename)


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(ringbuf_bytes: int = 1 << 20) -> Rig:
        made.append(Rig(ringbuf_bytes))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.bpf
def test_commands_in_a_session_are_recorded_with_path_argv_ppid_and_return_code(rig):
    r = rig()
    r.start_reader()
    ok = r.run("sh", "-c", "/bin/true child arg; exec /bin/cat /etc/hostname")
    assert ok.returncode == 0, ok.stderr
    failed = r.run("/nonexistent/prog", "a1")
    assert failed.returncode != 0
    r.settle()

    # The outer sh moved itself, then exec'd `sh -c ...` (looked up in PATH: the misses are failed
    # execs too), which forked /bin/true and exec'd cat.
    outer = [c for c in r.commands if c.argv[:2] == ("sh", "-c") and c.return_code == 0]
    assert len(outer) == 1, r.commands
    pid = outer[0].pid
    true, cat = (next(c for c in r.commands if c.path == p) for p in ("/bin/true", "/bin/cat"))
    assert true.argv == ("/bin/true", "child", "arg") and true.return_code == 0
    assert true.ppid == pid and true.pid != pid and true.comm == "true"
    assert cat.pid == pid and cat.argv == ("/bin/cat", "/etc/hostname") and cat.return_code == 0
    assert cat.comm == "cat" and cat.ppid == os.getpid()  # the shell's parent: this test
    assert cat.cgroup_id == r.cgid
    assert abs(cat.wall_time - time.time()) < 30

    bad = next(c for c in r.commands if c.path == "/nonexistent/prog")
    assert bad.return_code == -errno.ENOENT and bad.argv == ("/nonexistent/prog", "a1")
    assert bad.comm == "sh"  # a failed exec keeps the caller's comm

    ev = command_event(cat, SESSION)
    assert (ev.path, ev.argv, ev.program, ev.return_code, ev.sid) == ("/bin/cat", ["/etc/hostname"], "cat", 0,
                                                                      "sid-1")
    assert r.rec.lost() == {"exec": 0, "disk": 0}


OPEN_HELPER = r"""
import ctypes, os, platform, sys
procs, path, created = sys.argv[1:4]
with open(procs, "w") as f:
    f.write(str(os.getpid()))
libc = ctypes.CDLL(None, use_errno=True)

def syscall(*args):
    rc = libc.syscall(*args)
    return -ctypes.get_errno() if rc == -1 else rc

class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

how = OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, 0)
print("openat2", syscall(437, -100, path.encode(), ctypes.byref(how), ctypes.sizeof(how)))
print("openat", os.open(created, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
if platform.machine() == "x86_64":
    print("open", syscall(2, path.encode(), os.O_RDONLY | os.O_DIRECTORY, 0))  # not a directory
    print("creat", syscall(85, created.encode(), 0o600))
"""


@pytest.mark.bpf
def test_opens_in_a_session_are_recorded_with_path_flags_and_return_code(rig, tmp_path):
    r = rig()
    r.start_reader()
    assert r.run("/bin/cat", "/etc/hostname", "/nonexistent/file").returncode != 0
    created = tmp_path / "created"
    helper = subprocess.run([sys.executable, "-c", OPEN_HELPER, str(r.tree.path("rec") / "cgroup.procs"),
                             "/etc/hostname", str(created)], capture_output=True, text=True, timeout=60)
    assert helper.returncode == 0, helper.stderr
    results = dict(line.split() for line in helper.stdout.splitlines())
    r.settle()

    cat = next(c for c in r.commands if c.path == "/bin/cat")
    by_cat = [d for d in r.disks if d.pid == cat.pid]
    hostname = [d for d in by_cat if d.path == "/etc/hostname"]
    assert len(hostname) == 1
    assert hostname[0].flags & os.O_ACCMODE == os.O_RDONLY and hostname[0].return_code >= 0
    assert hostname[0].comm == "cat" and hostname[0].cgroup_id == r.cgid
    missing = next(d for d in by_cat if d.path == "/nonexistent/file")
    assert missing.return_code == -errno.ENOENT

    py = [d for d in r.disks if d.pid != cat.pid]
    openat2 = [d for d in py if d.path == "/etc/hostname" and d.flags == os.O_RDONLY | os.O_CLOEXEC]
    assert openat2 and openat2[0].return_code == int(results["openat2"]) >= 0
    writes = [d for d in py if d.path == str(created)]
    assert writes[0].flags == os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC  # os.open adds O_CLOEXEC
    assert writes[0].return_code == int(results["openat"]) >= 0
    if platform.machine() == "x86_64":
        legacy = [d for d in py if d.path == "/etc/hostname" and d.flags == os.O_RDONLY | os.O_DIRECTORY]
        assert legacy and legacy[0].return_code == -errno.ENOTDIR == int(results["open"])
        assert writes[1].flags == os.O_WRONLY | os.O_CREAT | os.O_TRUNC  # creat(2)
        assert writes[1].return_code == int(results["creat"]) >= 0

    ev = disk_event(hostname[0], SESSION)
    assert (ev.path, ev.flags, ev.program, ev.sid) == ("/etc/hostname", hostname[0].flags, "cat", "sid-1")


@pytest.mark.bpf
def test_only_recorded_session_cgroups_produce_records(rig, tmp_path):
    r = rig()
    r.start_reader()
    restricted_only = r.session("restricted-only", SESSION_RESTRICTED)
    r.session("unknown", None)  # a cgroup the sessions map does not know
    marker = tmp_path / f"outside-{uuid.uuid4().hex}"
    marker.write_text("x")
    outside = subprocess.Popen(["sh", "-c", 'i=0; while [ $i -lt 200 ]; do /bin/cat "$0" > /dev/null; '
                                            'i=$((i+1)); done', str(marker)])
    try:
        for sid in ("restricted-only", "unknown"):
            assert r.run("/bin/cat", str(marker), sid=sid).returncode == 0
        for _ in range(5):
            assert r.run("/bin/true", "inside").returncode == 0
    finally:
        outside.wait(60)
    r.settle()

    assert len([c for c in r.commands if c.argv == ("/bin/true", "inside")]) == 5
    assert {c.cgroup_id for c in r.commands} == {r.cgid}
    assert {d.cgroup_id for d in r.disks} == {r.cgid}
    assert restricted_only != r.cgid
    assert not [d for d in r.disks if str(marker) in d.path]
    assert not [c for c in r.commands if str(marker) in " ".join(c.argv)]


@pytest.mark.bpf
def test_exec_from_a_thread_and_long_argument_lists(rig):
    r = rig()
    r.start_reader()
    script = ("import os, sys, threading\n"
              "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
              "t = threading.Thread(target=lambda: os.execv('/bin/true', ['true', 'from-thread']))\n"
              "t.start(); t.join()\n")
    proc = subprocess.run([sys.executable, "-c", script, str(r.tree.path("rec") / "cgroup.procs")], timeout=60)
    assert proc.returncode == 0
    long_args = [f"a{i}" for i in range(30)]
    long_args[3] = "L" * 300
    assert r.run("/bin/true", *long_args).returncode == 0
    r.settle()

    threaded = next(c for c in r.commands if c.argv == ("true", "from-thread"))
    assert threaded.return_code == 0 and threaded.path == "/bin/true"
    many = next(c for c in r.commands if c.argv[:2] == ("/bin/true", "a0"))
    assert len(many.argv) == MAX_ARGS and many.args_missing
    assert many.argv[4] == "L" * 127 and many.truncated_args == {4}
    assert command_event(many, None).argv[-2:] == ["a18", "..."]
    assert len(r.rec.bpf[b"exec_pending"]) == 0 and len(r.rec.bpf[b"disk_pending"]) == 0


@pytest.mark.bpf
def test_full_ring_buffers_count_drops_and_keep_records_for_the_next_reader(rig):
    r = rig(ringbuf_bytes=4096)  # one page; nobody reads it yet
    result = r.run("sh", "-c", 'i=0; while [ $i -lt 100 ]; do /bin/true "$i"; i=$((i+1)); done')
    assert result.returncode == 0
    lost = r.rec.lost()
    assert lost["exec"] > 0 and lost["disk"] > 0

    # A later loader (the next enforcer) reads what the pinned ring buffers kept.
    r.rec.close()
    r.rec = RecordingBPF(r.pins, r.ringbuf_bytes)
    assert r.rec.lost() == lost
    r.start_reader()
    r.settle()
    loop = [c for c in r.commands if c.path == "/bin/true"]
    # The ring buffer refuses records when full: the first ones (`sh -c` and the start of the
    # loop) were kept, every later one was counted.
    assert loop and len(loop) + lost["exec"] == 100
    assert [c.argv[1] for c in loop] == [str(i) for i in range(len(loop))]  # the oldest ones were kept
    assert r.disks


def _opens_of(disks: list[DiskRecord], path: str) -> list[DiskRecord]:
    return [d for d in disks if d.path == path]


@pytest.mark.bpf
def test_repeated_opens_are_folded_in_the_kernel_and_every_one_is_counted(rig, tmp_path):
    r = rig()
    r.start_reader()
    target = tmp_path / "read-often"
    target.write_text("x")
    once = tmp_path / "read-once"
    once.write_text("y")
    loop = f'i=0; while [ $i -lt 300 ]; do /bin/cat {target} > /dev/null; i=$((i+1)); done; /bin/cat {once}'
    started = time.monotonic()
    assert r.run("sh", "-c", loop).returncode == 0
    intervals = (time.monotonic() - started) / FOLD_INTERVAL + 2
    assert r.run("/bin/cat", str(tmp_path / "missing")).returncode != 0
    assert r.run("/bin/cat", str(tmp_path / "missing")).returncode != 0
    r.settle()

    often = _opens_of(r.disks, str(target))
    assert sum(d.opens for d in often) == 300  # every open counted
    # ... without a record each: per FOLD_INTERVAL, the first open and one fold of its repeats.
    assert len(often) <= min(2 * intervals, 150), (len(often), intervals)
    singles, folds = [d for d in often if not d.repeats], [d for d in often if d.repeats]
    assert singles[0].return_code >= 0 and singles[0].comm == "cat" and folds
    for fold in folds:
        assert fold.comm == "cat" and fold.return_code >= 0 and fold.cgroup_id == r.cgid
        assert fold.first_wall_time <= fold.wall_time and fold.first_boot_ns <= fold.boot_ns
    # Each fold follows the open it counts repeats of, and the pids are those of cat processes.
    assert r.disks.index(singles[0]) < r.disks.index(folds[0])
    cats = {c.pid for c in r.commands if c.path == "/bin/cat"}
    assert {d.pid for d in often} <= cats and len(cats) >= 301

    assert [d.repeats for d in _opens_of(r.disks, str(once))] == [0]  # opened once: as it was
    missing = _opens_of(r.disks, str(tmp_path / "missing"))
    assert sum(d.opens for d in missing) == 2 and all(d.return_code == -errno.ENOENT for d in missing)
    # A write open of the same file is not folded into the reads.
    assert r.run("sh", "-c", f"echo z >> {target}").returncode == 0
    r.settle()
    writes = [d for d in _opens_of(r.disks, str(target)) if d.flags & os.O_ACCMODE == os.O_WRONLY]
    assert len(writes) == 1 and writes[0].repeats == 0 and writes[0].comm == "sh"
    assert r.rec.lost() == {"exec": 0, "disk": 0}


@pytest.mark.bpf
def test_repeats_counted_while_no_enforcer_reads_are_written_by_the_next(rig, tmp_path):
    r = rig()
    r.start_reader()
    target = tmp_path / "read-often"
    target.write_text("x")
    r.run("/bin/true")
    r.settle()  # the fold maps are switched: opens are folded from now on
    script = f'i=0; while [ $i -lt 50 ]; do /bin/cat {target} > /dev/null; i=$((i+1)); done; sleep 30'
    procs = r.tree.path("rec") / "cgroup.procs"
    shell = subprocess.Popen(["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), "sh", "-c", script])
    try:
        wait_for(lambda: sum(1 for c in r.commands if c.path == "/bin/cat") >= 50 and
                 _opens_of(r.disks, str(target)), 30, what="the loop to run")
        # The enforcer stops (crash or restart) while the repeats are only counted in the kernel.
        r.rec.close()
        r.rec = RecordingBPF(r.pins, r.ringbuf_bytes)
        r.start_reader()
        r.settle()
    finally:
        shell.kill()
        shell.wait()
    assert sum(d.opens for d in _opens_of(r.disks, str(target))) == 50


FLOOD_HELPER = r"""
import os, sys
procs, directory, target = sys.argv[1:4]
with open(procs, "w") as f:
    f.write(str(os.getpid()))
for i in range(int(sys.argv[4])):  # distinct paths: each a key of its own in the fold map
    try:
        os.open(f"{directory}/missing-{i}", os.O_RDONLY)
    except FileNotFoundError:
        pass
for _ in range(50):
    os.close(os.open(target, os.O_RDONLY))
"""


@pytest.mark.bpf
def test_a_session_filling_the_fold_map_gets_every_open_written_one_by_one(rig, tmp_path):
    # A user who opens more distinct paths than the fold map holds does not lose an open: once
    # the map is full, nothing more is folded and every open is written as it happened.
    from services.enforcer.disk_folds import MAX_ENTRIES

    r = rig(ringbuf_bytes=16 << 20)
    r.start_reader()
    target = tmp_path / "read-often"
    target.write_text("x")
    distinct = MAX_ENTRIES + 1000
    helper = subprocess.run([sys.executable, "-c", FLOOD_HELPER, str(r.tree.path("rec") / "cgroup.procs"),
                             str(tmp_path), str(target), str(distinct)], capture_output=True, text=True, timeout=120)
    assert helper.returncode == 0, helper.stderr
    r.settle()
    missing = [d for d in r.disks if "/missing-" in d.path]
    assert sum(d.opens for d in missing) == distinct
    assert len({d.path for d in missing}) == distinct
    assert sum(d.opens for d in _opens_of(r.disks, str(target))) == 50
    assert r.rec.lost() == {"exec": 0, "disk": 0}
