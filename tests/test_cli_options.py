"""The CLI's global options go before or after the command; the CLI finds its stack's NATS URL."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from ringfence.cli.client import NATS_URL_FILE, config_from
from ringfence.cli.commands import COMMANDS
from ringfence.cli.main import _subcommands, build_parser, hoist_global_options
from ringfence.cli.up import record_nats_url


@pytest.mark.parametrize(("argv", "hoisted"), [
    ("--identity F lock --user=bob", "lock --identity F --user=bob"),
    ("--format json events search --since 1h", "events search --format json --since 1h"),
    ("--data-dir=/d users add alice", "users add --data-dir=/d alice"),
    ("--nats-url u run -- curl --identity x", "run --nats-url u -- curl --identity x"),
    ("--identity F bogus", "bogus --identity F"),  # reported as an unknown command
    ("status --identity F", "status --identity F"),  # already after: unchanged
    ("", ""),
])
def test_global_options_move_after_the_command(argv, hoisted):
    assert hoist_global_options(argv.split(), build_parser()) == hoisted.split()


@pytest.mark.parametrize("argv", [
    ["--identity", "alice.nk", "lock", "--user=bob", "--ttl=1h"],
    ["lock", "--user=bob", "--identity", "alice.nk", "--ttl=1h"],
])
def test_identity_before_or_after_the_command(argv):
    parser = build_parser("lock")
    args = parser.parse_args(hoist_global_options(argv, parser))
    assert (args.identity, args.user, args.ttl) == ("alice.nk", "bob", "1h")


def test_format_before_a_subcommand_is_checked_by_that_command(capsys):
    parser = build_parser("events")
    args = parser.parse_args(hoist_global_options(["--format", "json", "events", "search"], parser))
    assert args.format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(hoist_global_options(["--format", "yaml", "events", "search"], parser))
    assert "invalid choice: 'yaml'" in capsys.readouterr().err


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RINGFENCE_NATS_URL", "RINGFENCE_DATA_DIR", "RINGFENCE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_cli_uses_the_url_up_recorded_unless_told_otherwise(tmp_path, clean_env):
    path = record_nats_url(tmp_path, ["nats://127.0.0.1:4300", "nats://127.0.0.1:4301"])
    assert path == tmp_path / NATS_URL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # root-readable only
    parser = build_parser("status")

    def url(*argv: str) -> str:
        return config_from(parser.parse_args(["status", "--data-dir", str(tmp_path), *argv])).nats_url

    assert url() == "nats://127.0.0.1:4300,nats://127.0.0.1:4301"
    assert url("--nats-url", "nats://10.0.0.1:4222") == "nats://10.0.0.1:4222"
    clean_env.setenv("RINGFENCE_NATS_URL", "nats://10.0.0.2:4222")
    assert url() == "nats://10.0.0.2:4222"
    clean_env.delenv("RINGFENCE_NATS_URL")
    path.unlink()
    assert url() == "nats://127.0.0.1:4222"  # nothing recorded: the default
    up_args = build_parser("up").parse_args(["up", "--data-dir", str(tmp_path)])
    record_nats_url(tmp_path, ["nats://127.0.0.1:4300"])
    assert config_from(up_args, recorded_url=False).nats_url == "nats://127.0.0.1:4222"  # up decides afresh


def test_every_command_is_listed_with_its_module():
    """commands.COMMANDS names each command's module (only that one is imported to run it)."""
    every = set(_subcommands(build_parser()))
    assert every == set(COMMANDS)
    for command, modules in COMMANDS.items():  # each command's own parser has it
        assert command in _subcommands(build_parser(command)), (command, modules)


def test_the_cli_imports_aiohttp_only_when_used():
    """nats-py imports aiohttp for ws:// URLs; the CLI puts that off (bench cli: ~90 ms of CPU)."""
    probe = ("import sys, ringfence.cli.main as m; m.build_parser('status'); "
             "print(type(sys.modules.get('aiohttp')).__name__); "
             "import nats.aio.transport as t; print(t.aiohttp.WSMsgType.BINARY.name)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["_ImportedOnUse", "BINARY"]  # deferred, and there when used
