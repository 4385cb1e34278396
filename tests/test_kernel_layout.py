"""The records and maps user space decodes have the layout bpf/ringfence.h gives them,
and every kernel implementation offers what the enforcer calls (kernel.Kernel)."""

from __future__ import annotations

import ctypes
import json
import subprocess

import pytest

from services.enforcer import recording_bpf, restricted_bpf
from services.enforcer.kernel import Kernel, RecordSource
from services.enforcer.netevents import NET_EVENT
from services.enforcer.recording_bpf import DISK_HEADER, EXEC_HEADER, RecordingBPF
from services.enforcer.restricted_bpf import LostKeyStruct, RestrictedBPF, Settings
from services.enforcer.simulated import SimulatedKernel
from tests.support.procs import ROOT

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32;
typedef unsigned long long u64; typedef int s32; typedef long long s64;
#include "ringfence.h"
int main(void) {
    printf("{\"net_event\": %zu, \"exec_header\": %zu, \"disk_header\": %zu, \"lost_key\": %zu, "
           "\"settings\": %zu, \"session_flags\": %zu, \"MAX_ARGS\": %d, \"ARG_BYTES\": %d, "
           "\"EXEC_PATH_BYTES\": %d, \"DISK_PATH_BYTES\": %d, \"TRUNC_PATH\": %d, \"TRUNC_ARGS\": %d, "
           "\"SESSION_RESTRICTED\": %d, \"SESSION_RECORDED\": %d}\n",
           sizeof(struct net_event), offsetof(struct exec_event, data), offsetof(struct disk_event, path),
           sizeof(struct lost_key), sizeof(struct settings), sizeof(struct session_flags), MAX_ARGS, ARG_BYTES,
           EXEC_PATH_BYTES, DISK_PATH_BYTES, TRUNC_PATH, TRUNC_ARGS, SESSION_RESTRICTED, SESSION_RECORDED);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("layout")
    (work / "probe.c").write_text(PROBE)
    subprocess.run(["cc", "-I", str(ROOT / "bpf"), "-o", str(work / "probe"), str(work / "probe.c")], check=True)
    return json.loads(subprocess.run([str(work / "probe")], capture_output=True, text=True, check=True).stdout)


def test_record_layouts_match_the_python_decoders(c_layout):
    assert c_layout["net_event"] == NET_EVENT.size
    assert c_layout["exec_header"] == EXEC_HEADER.size
    assert c_layout["disk_header"] == DISK_HEADER.size
    assert c_layout["lost_key"] == ctypes.sizeof(LostKeyStruct)
    assert c_layout["settings"] == ctypes.sizeof(Settings)
    assert c_layout["session_flags"] == 4


def test_limits_and_flags_match(c_layout):
    for name in ("MAX_ARGS", "ARG_BYTES", "EXEC_PATH_BYTES", "DISK_PATH_BYTES", "TRUNC_PATH", "TRUNC_ARGS"):
        assert c_layout[name] == getattr(recording_bpf, name), name
    assert c_layout["SESSION_RESTRICTED"] == restricted_bpf.SESSION_RESTRICTED
    assert c_layout["SESSION_RECORDED"] == restricted_bpf.SESSION_RECORDED


def members(protocol: type) -> set[str]:
    return {n for n in dir(protocol) if not n.startswith("_")} | set(getattr(protocol, "__annotations__", {}))


@pytest.mark.parametrize(("cls", "protocol"), [(RestrictedBPF, Kernel), (SimulatedKernel, Kernel),
                                               (RecordingBPF, RecordSource)])
def test_every_kernel_implements_its_protocol(cls, protocol):
    missing = [m for m in members(protocol) if m != "reader_cycles" and not callable(getattr(cls, m, None))]
    assert not missing, f"{cls.__name__} lacks {missing}"
