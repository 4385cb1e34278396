"""The few bpf(2) commands bcc's Python API does not offer: cgroup links (created,
pinned, re-pointed at a new program), listing the programs attached to a cgroup
and detaching stale ones left by an earlier enforcer."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)

BPF_MAP_LOOKUP_ELEM = 1
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29

# enum bpf_attach_type
CGROUP_INET_EGRESS = 1
CGROUP_INET_SOCK_CREATE = 2
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 64),
    ]


class _DetachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 64),
    ]


class _GetFdAttr(ctypes.Structure):
    _fields_ = [("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 64)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64),
                ("pad", ctypes.c_uint8 * 64)]


class _ProgInfo(ctypes.Structure):
    # The head of struct bpf_prog_info, up to and including name.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad0", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("pad", ctypes.c_uint8 * 64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 64)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 64)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("old_prog_fd", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 64)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def attached_prog_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=cgroup_fd, attach_type=attach_type, prog_ids=ctypes.addressof(ids), prog_cnt=64)
    _bpf(BPF_PROG_QUERY, attr)
    return list(ids[: attr.prog_cnt])


def prog_id(prog_fd: int) -> int:
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info.id


def detach_prog_id(cgroup_fd: int, attach_type: int, prog_id_: int) -> None:
    fd = _bpf(BPF_PROG_GET_FD_BY_ID, _GetFdAttr(prog_id=prog_id_))
    try:
        _bpf(BPF_PROG_DETACH, _DetachAttr(target_fd=cgroup_fd, attach_bpf_fd=fd, attach_type=attach_type))
    finally:
        os.close(fd)


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns its fd."""
    raw = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(raw)))


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=map_fd, key=ctypes.addressof(k), value=ctypes.addressof(v)))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == 2:  # ENOENT
            return None
        raise
    return v.raw


def obj_pin(fd: int, path: str) -> None:
    raw = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=fd))


def link_create(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """Attach a program to a cgroup through a new bpf_link; returns the link's fd.
    Links run alongside programs attached with BPF_F_ALLOW_MULTI."""
    return _bpf(BPF_LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, target_fd=cgroup_fd, attach_type=attach_type))


def link_update(link_fd: int, prog_fd: int) -> None:
    """Point an existing link at another program, atomically: no moment without one."""
    _bpf(BPF_LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=prog_fd))
