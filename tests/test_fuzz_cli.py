"""Fuzzing CLI input (issue 7): `ringfence create -f` with random YAML (non-mapping
documents, huge, deeply nested, alias bombs, binary) and `ringfence lock` with random
flag values. Either it works (exit 0) or it exits 1 with one `ERROR: ...` message;
never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringfence.cli.main import main
from ringfence.contract import resources as r
from tests.support.fuzz import TEMPLATES, json_values, mutated, texts
from tests.support.procs import ROOT

pytestmark = pytest.mark.timeout(120)

NO_AUTH = {"RINGFENCE_OPERATOR_AUTH": "off"}
CLI = [sys.executable, "-m", "ringfence.cli.main"]


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) as the shell would run it: (exit code, stdout, stderr). Any exception
    other than SystemExit escapes, i.e. would have been a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


def assert_ok_or_one_error(code: int, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    if code == 0:
        assert "ERROR" not in stderr, stderr
        return
    assert code == 1, (code, stderr)
    assert stderr.startswith("ERROR: ") and stderr.count("ERROR:") == 1, stderr[:2000]
    assert stderr[len("ERROR: "):].strip(), stderr


def _dump(docs) -> str:
    try:
        return yaml.safe_dump_all(docs, allow_unicode=True)
    except yaml.YAMLError:
        return "kind: role\n"


def alias_bomb(levels: int, fanout: int) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * fanout) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + "\nkind: role\n"


NASTY_YAML = [
    "", "---\n---\n", "just a string\n", "- a\n- b\n", "42\n", "kind: role\n---\n- x\n", "!!binary AAAA\n",
    "kind: role\nkind: user\n", "a: &x [*x]\n", "a: &x {b: *x}\nkind: role\n", alias_bomb(9, 10),
    "a: " + "[" * 3000 + "]" * 3000 + "\n", "{a: " * 800 + "1" + "}" * 800 + "\n",
    "kind: !!python/object:os.system x\n",
    "kind: role\nmetadata: {name: \"\\x00\"}\n", "? [a, b]\n: c\n", "{1: 2, true: 3, null: 4}\n",
    "kind: role\nversion: v5\nmetadata:\n  name: a\n  labels: {2001-01-01: x}\n", "\t- x\n", "kind: 1e999\n",
    "kind: role\nversion: v5\nmetadata:\n  name: big\nspec:\n  options:\n"
    "    max_sessions: 123456789012345678901234567890\n",
    "kind: role\nversion: v5\nmetadata:\n  name: ok-from-fuzz\n",
]

yaml_texts = (
    st.sampled_from(NASTY_YAML)
    | st.text(max_size=200)
    | st.builds(_dump, st.lists(mutated(TEMPLATES) | json_values, min_size=1, max_size=3))
    | st.builds(lambda docs: "\n---\n".join(docs), st.lists(st.sampled_from(NASTY_YAML), max_size=3))
)


@pytest.fixture
def stack(nats_server, services):
    services("policy", "locks", env=NO_AUTH)
    return nats_server.url


def test_create_with_random_yaml(stack):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(yaml_texts | st.binary(max_size=200))
        def create(content):
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8", errors="surrogatepass")
            else:
                path.write_bytes(content)
            code, _out, err = run_in_process(["create", "-f", str(path), "--nats-url", stack])
            assert_ok_or_one_error(code, err)

        create()


def test_create_with_huge_files(stack, tmp_path):
    files = {
        "over-16mib.yaml": "# " + "x" * (16 * 1024 * 1024) + "\nkind: role\n",
        "huge-document.yaml": "kind: role\nversion: v5\nmetadata:\n  name: huge\n  description: "
                              + "x" * (15 * 1024 * 1024) + "\n",
        "many-documents.yaml": "".join(f"---\nkind: role\nversion: v5\nmetadata: {{name: r{i}, description: "
                                       f"{'d' * 5000}}}\n" for i in range(3000)),
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        code, _out, err = run_in_process(["create", "-f", str(tmp_path / name), "--nats-url", stack])
        assert code == 1, (name, err[:500])
        assert_ok_or_one_error(code, err)


def test_create_from_the_real_command_line(stack, tmp_path):
    """A few of the nastiest inputs through the real executable: exit 1, one ERROR line."""
    for i, content in enumerate([alias_bomb(9, 10), "a: &x [*x]\n", "a: " + "[" * 3000 + "]" * 3000 + "\n",
                                 "\x00\x01\x02", "- 1\n- 2\n"]):
        path = tmp_path / f"nasty{i}.yaml"
        path.write_text(content)
        result = subprocess.run([*CLI, "create", "-f", str(path), "--nats-url", stack], capture_output=True,
                                text=True, timeout=30, cwd=ROOT)
        assert result.returncode == 1, result.stderr
        assert_ok_or_one_error(result.returncode, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
    result = subprocess.run([*CLI, "create", "-f", "-", "--nats-url", stack], input=b"\xff\xfe\x00garbage",
                            capture_output=True, timeout=30, cwd=ROOT)
    assert (result.returncode, result.stderr) == (1, b"ERROR: <stdin>: not UTF-8 text (byte 0)\n")


flag_values = texts | st.sampled_from(["\udcff", "-", "--", "-1h", "1h", "2099-01-01T00:00:00Z", "x" * 5000])


def test_lock_with_random_flag_values(stack):
    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from([*r.LOCK_TARGET_FIELDS, "message", "ttl", "expires"]), flag_values,
                           max_size=4))
    def lock(flags):
        argv = ["lock", "--nats-url", stack] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
        code, out, err = run_in_process(argv)
        assert_ok_or_one_error(code, err)
        if code == 0:
            assert out.startswith("Created a lock with name "), out

    lock()
