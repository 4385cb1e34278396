"""Recording modes, as the original's session_recording_config: node (recorded on the node,
sessions carry on if it cannot be), node-sync (a session whose recording cannot be written
ends, with a message), off."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.enforcer import EnforcerNode
from tests.support.procs import ROOT, wait_for

pytestmark = pytest.mark.bpf

CHATTY = ("i=0; while [ $i -lt 3000 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; "
          "i=$((i+1)); done; sleep 2; echo survived")


def _mode(url: str, tmp_path, mode: str) -> None:
    doc = tmp_path / "rec.yaml"
    doc.write_text(f"kind: session_recording_config\nversion: v2\nmetadata:\n  name: session-recording-config\n"
                   f"spec:\n  mode: {mode}\n")
    out = subprocess.run([sys.executable, "-m", "ringfence.cli.main", "create", "-f", str(doc), "--nats-url", url],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.fixture
def full_disk_node(nats_server, data_dir, tmp_path):
    """An enforcer whose session journals live on a nearly full filesystem."""
    relays = data_dir / "node" / "enforcer" / "relays"
    relays.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(relays)], check=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={relays}/filler", "bs=1k", "count=236"], capture_output=True)
    node = EnforcerNode(nats_server.url, data_dir / "node")
    try:
        yield node
    finally:
        node.cleanup()
        subprocess.run(["umount", "-l", str(relays)], check=False)


def test_node_sync_ends_a_session_whose_recording_cannot_be_written(nats_server, services, full_disk_node,
                                                                    tmp_path):
    services("policy", "audit")
    _mode(nats_server.url, tmp_path, "node-sync")
    node = full_disk_node.start()
    wait_for(lambda: "session socket at" in node.log(), what="the enforcer")
    result = node.run("sh", "-c", CHATTY, check=False)
    assert "survived" not in result.stdout and result.returncode != 0
    assert "cannot write the session journal" in result.stderr and "node-sync" in result.stderr, result.stderr


def test_node_keeps_a_session_going_when_its_recording_cannot_be_written(nats_server, services, full_disk_node,
                                                                         tmp_path):
    services("policy", "audit")
    _mode(nats_server.url, tmp_path, "node")
    node = full_disk_node.start()
    result = node.run("sh", "-c", CHATTY, check=False)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("survived"), result.stderr
