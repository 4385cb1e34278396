"""The hooks' side of the enforcer socket (ringfence/hooks/wire.py): JSON exactly as
the json package writes and reads it, and a start-up that imports nothing but
modules built into the interpreter (every SSH login starts two of them)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess

import msgspec
import pytest

from ringfence.contract.api import OpenSessionReply, OpenSessionRequest
from ringfence.hooks import wire
from tests.support.sshd import HOOKS, PYTHON

VALUES = [
    "", "plain", 'quote " backslash \\ slash /', "tab\tnewline\ncr\rnul\x00bell\x07del\x7f",
    "é ü ß 中文 🚀", "\udcff lone surrogate (a byte os.environ could not decode)", "\u2028\u2029",
    0, 7, -1, 2**63, True, False, None, [], {}, ["a", 1, None, [True, {}]],
    {"kind": "channel", "command": ["ls -la"], "env": {"LANG": "C.UTF-8", "X": "=;\"'"}},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_dumps_writes_what_json_dumps_writes(value):
    assert wire.dumps(value) == json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize("bad", [{1: "x"}, {"a": {None: 1}}, 1.5, b"bytes", {"a"}], ids=repr)
def test_dumps_refuses_what_a_request_cannot_hold(bad):
    with pytest.raises(TypeError):
        wire.dumps(bad)


def test_a_request_decodes_as_the_enforcer_decodes_it():
    request = {"kind": "connection", "login": "alice", "auth_info": "publickey ssh-ed25519 AAAA\n",
               "command": ["echo é"], "env": {"TERM": "xterm"}}
    decoded = msgspec.json.decode(wire.dumps(request).encode(), type=OpenSessionRequest)
    assert (decoded.kind, decoded.login, decoded.auth_info, decoded.command, decoded.env) == (
        "connection", "alice", "publickey ssh-ed25519 AAAA\n", ["echo é"], {"TERM": "xterm"})


@pytest.mark.parametrize("text", [
    msgspec.json.encode(OpenSessionReply(ok=True, sid="s-1", user="bob")).decode(),
    msgspec.json.encode(OpenSessionReply(ok=False, error='locked: "why" \u00e9')).decode(),
    '{"exit":0}', ' {"exit": 255}\r\n', '{"a":[1,2.5,-3e2,true,false,null,"\\u00e9\\n"]}', '"x"', "[]", "12",
])
def test_loads_reads_what_json_loads_reads(text):
    assert wire.loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "   ", "{", '{"exit":0} {"exit":1}', '{"exit":0}x', "[1,]", "NaN",
                                  '{"exit":Infinity}', "{'exit':0}", '{"a":"\\x"}', '"\x01"'])
def test_loads_refuses_what_is_not_one_json_value(text):
    with pytest.raises(ValueError):
        wire.loads(text)


def _imports(*argv: str, env: dict | None = None) -> set[str]:
    """The modules `python3 -I -S ARGV` imports (-X importtime), as sshd starts the hooks."""
    result = subprocess.run([PYTHON, "-I", "-S", "-X", "importtime", *argv], capture_output=True, text=True,
                            timeout=60, env=env or {})
    return {line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("hook", [["pam_hook.py", "--data-dir", "/nonexistent"],
                                  ["ssh_session.py", "--socket", "/nonexistent"]], ids=lambda h: h[0])
def test_the_hooks_import_only_modules_built_into_the_interpreter(hook):
    bare = _imports("-c", "pass")
    # PAM_TYPE open_session: the hook goes as far as connecting (and finds no enforcer).
    used = _imports(str(HOOKS / hook[0]), *hook[1:], env={"PAM_TYPE": "open_session", "PAM_USER": "nobody"})
    assert "ringfence.hooks.wire" in used
    python_modules = {m for m in used - bare if not m.startswith("ringfence") and not _compiled_in(m)}
    assert not python_modules, f"{hook[0]} imports {sorted(python_modules)}: each costs every SSH login"


def _compiled_in(name: str) -> bool:
    """Built in, frozen, or a C extension (Debian ships _json as one): no Python to load and run."""
    spec = importlib.util.find_spec(name)
    return spec is not None and (spec.origin in ("built-in", "frozen")
                                 or isinstance(spec.loader, importlib.machinery.ExtensionFileLoader))


def test_wire_works_without_the_json_accelerator():
    """Another interpreter may lack _json: the json package's own functions take over."""
    code = """if True:
        import sys
        sys.modules["_json"] = None
        sys.path.insert(0, sys.argv[1])
        from ringfence.hooks import wire
        assert "json.decoder" in sys.modules
        assert wire.loads(wire.dumps({"a": ["é", 1, None]})) == {"a": ["é", 1, None]}
        try:
            wire.loads("[1,]")
        except ValueError:
            print("refused")
    """
    result = subprocess.run([PYTHON, "-I", "-S", "-c", code, str(HOOKS.parents[1])], capture_output=True, text=True,
                            timeout=60, env={})
    assert result.stdout.strip() == "refused", result.stderr
