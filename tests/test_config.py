"""The YAML config: keys modelled on teleport.yaml, strict, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringfence.config import ConfigError, load_config, parse_config


def test_seed_shaped_config_is_accepted(tmp_path):
    path = tmp_path / "ringfence.yaml"
    path.write_text(
        """
cluster_name: teleport-quickstart
nodename: graviton-node
data_dir: /var/lib/ringfence
nats_url: nats://10.0.0.5:4222,nats://10.0.0.6:4222
ssh_service:
  enhanced_recording:
    enabled: true
    cgroup_path: /cgroup2
  restricted_session:
    enabled: true
"""
    )
    cfg = load_config(str(path))
    assert cfg.cluster_name == "teleport-quickstart"
    assert cfg.nodename == "graviton-node"
    assert cfg.nats_urls == ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
    assert cfg.ssh_service.enhanced_recording.cgroup_path == "/cgroup2"
    assert cfg.ssh_service.restricted_session.enabled is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodname: x", "nodname: unknown field"),
        ("ssh_service:\n  restricted_session:\n    enabled: maybe",
         'ssh_service.restricted_session.enabled: "maybe": expected `bool`, got `str`'),
        ("data_dir: relative/dir", 'data_dir: "relative/dir": must be an absolute path'),
        ("ssh_service:\n  enhanced_recording:\n    cgroup_path: cgroup2",
         'ssh_service.enhanced_recording.cgroup_path: "cgroup2": must be an absolute path'),
        ("nats_url: http://x", 'nats_url: "http://x": expected nats://host:port'),
        ("lock_view_max_staleness: soon", 'lock_view_max_staleness: "soon" is not a duration'),
        ("- a\n- b", "expected a mapping of keys, got list"),
        ("a: [", "not valid YAML"),
    ],
)
def test_bad_config_names_key_and_value(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_flags_beat_environment_beat_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("data_dir: /from/file\nnats_url: nats://file:1\n")
    monkeypatch.setenv("RINGFENCE_DATA_DIR", "/from/env")
    cfg = load_config(str(path))
    assert cfg.data_dir == "/from/env" and cfg.nats_url == "nats://file:1"
    cfg = load_config(str(path), data_dir="/from/flag", nats_url="nats://flag:2")
    assert cfg.data_dir == "/from/flag" and cfg.nats_url == "nats://flag:2"


def test_defaults_without_a_file(monkeypatch):
    monkeypatch.delenv("RINGFENCE_DATA_DIR", raising=False)
    monkeypatch.delenv("RINGFENCE_CONFIG", raising=False)
    cfg = parse_config("", "(test)")
    assert cfg.data_dir == "/var/lib/ringfence"
    assert cfg.ssh_service.restricted_session.enabled is True
    assert cfg.ssh_service.enhanced_recording.enabled is False


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_operator_auth_defaults_to_required_and_is_validated(tmp_path, monkeypatch):
    monkeypatch.delenv("RINGFENCE_OPERATOR_AUTH", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("nats_nkey: relative/cli.nk\n")
    cfg = load_config(str(path))
    assert cfg.operator_auth == "required"
    assert cfg.nats_nkey == str(Path.cwd() / "relative/cli.nk")
    path.write_text("operator_auth: off\n")  # YAML reads a bare off as false
    assert load_config(str(path)).operator_auth == "off"
    path.write_text('operator_auth: "off"\n')
    assert load_config(str(path)).operator_auth == "off"
    path.write_text('operator_auth: "maybe"\n')
    with pytest.raises(ConfigError, match=r'operator_auth: "maybe": use required or off'):
        load_config(str(path))
    path.write_text('operator_auth: "off"\n')
    monkeypatch.setenv("RINGFENCE_OPERATOR_AUTH", "required")
    assert load_config(str(path)).operator_auth == "required"
    monkeypatch.setenv("RINGFENCE_OPERATOR_AUTH", "no")
    with pytest.raises(ConfigError, match=r'^RINGFENCE_OPERATOR_AUTH: "no": use required or off$'):
        load_config(str(path))


def test_nats_replicas_defaults_to_1_takes_3_or_5_and_env_and_flag_override(tmp_path, monkeypatch):
    monkeypatch.delenv("RINGFENCE_NATS_REPLICAS", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(str(path)).nats_replicas == 1
    path.write_text("nats_replicas: 3\n")
    assert load_config(str(path)).nats_replicas == 3
    for bad in ("2", "0", "7", '"three"'):
        path.write_text(f"nats_replicas: {bad}\n")
        with pytest.raises(ConfigError, match=r"nats_replicas: "):
            load_config(str(path))
    path.write_text("nats_replicas: 2\n")
    with pytest.raises(ConfigError, match=r"nats_replicas: 2: use 1, 3, 5$"):
        load_config(str(path))
    path.write_text("nats_replicas: 3\n")
    monkeypatch.setenv("RINGFENCE_NATS_REPLICAS", "5")
    assert load_config(str(path)).nats_replicas == 5
    assert load_config(str(path), nats_replicas=1).nats_replicas == 1  # a flag beats both
    monkeypatch.setenv("RINGFENCE_NATS_REPLICAS", "4")
    with pytest.raises(ConfigError, match=r'^RINGFENCE_NATS_REPLICAS: "4": use 1, 3, 5$'):
        load_config(str(path))


# --- the original's teleport.yaml ------------------------------------------------------------------------

# The seed's node config (000), its lost keys filled in, plus the auth settings a migrating team has.
TELEPORT_YAML = (Path(__file__).parents[1] / "examples" / "migration" / "teleport.yaml").read_text()


def teleport_yaml(tmp_path: Path, text: str = TELEPORT_YAML) -> str:
    path = tmp_path / "teleport.yaml"
    path.write_text(text)
    return str(path)


def test_a_teleport_yaml_maps_onto_ringfence_settings(tmp_path):
    warnings: list[str] = []
    path = teleport_yaml(tmp_path)
    cfg = load_config(path, warnings=warnings)
    assert (cfg.nodename, cfg.data_dir, cfg.cluster_name) == ("graviton-node", "/var/lib/teleport",
                                                              "teleport-quickstart")
    assert cfg.ssh_service.enhanced_recording.enabled and cfg.ssh_service.enhanced_recording.cgroup_path == "/cgroup2"
    assert cfg.ssh_service.restricted_session.enabled
    auth = cfg.auth_service
    assert (auth.authentication.locking_mode, auth.session_recording, auth.client_idle_timeout) == (
        "strict", "node-sync", "15m")
    # One warning per ignored section, naming it; proxy_service is only `enabled: false`: nothing to say.
    sections = [w for w in warnings if w.split(": ")[1].endswith("_service")]
    assert sections == [f"{path}: db_service: ignored: Ringfence controls OpenSSH sessions, not databases",
                        f"{path}: windows_desktop_service: ignored: Ringfence controls OpenSSH sessions, "
                        "not Windows desktops"]
    text = "\n".join(warnings)
    for key in ("teleport.auth_token", "teleport.auth_server", "teleport.log", "teleport.connection_limits",
                "auth_service.authentication.type", "auth_service.keep_alive_interval", "ssh_service.labels",
                "ssh_service.enhanced_recording.command_buffer_size"):
        assert key in text
    assert "MaxStartups" in text  # connection_limits: what to use instead


@pytest.mark.parametrize(("change", "message"), [
    (("locking_mode: strict", "locking_mode: strikt"),
     'auth_service.authentication.locking_mode: "strikt": use best_effort or strict'),
    (("session_recording: node-sync", "session_recording: sometimes"), 'auth_service.session_recording: "sometimes"'),
    (("client_idle_timeout: 15m", "client_idle_timeout: soon"),
     'auth_service.client_idle_timeout: "soon" is not a duration'),
    (("  restricted_session:\n    enabled: true", "  restricted_session:\n    enabled: maybe"),
     'ssh_service.restricted_session.enabled: "maybe": expected `bool`'),
    (("  enhanced_recording:", "  enhanced_recordin:"), "ssh_service.enhanced_recordin: unknown field"),
    (("  nodename: graviton-node", "  nodename: graviton node"), 'nodename: "graviton node"'),
    (("version: v3", "version: v9"), 'version: "v9": expected one of v1, v2, v3'),
])
def test_a_bad_value_in_a_teleport_yaml_names_key_and_value(tmp_path, change, message):
    text = TELEPORT_YAML.replace(*change)
    assert text != TELEPORT_YAML
    with pytest.raises(ConfigError) as info:
        load_config(teleport_yaml(tmp_path, text), warnings=[])
    assert message in str(info.value) and str(tmp_path / "teleport.yaml") in str(info.value)


def test_proxy_session_recording_modes_record_on_the_node():
    warnings: list[str] = []
    cfg = parse_config(TELEPORT_YAML.replace("node-sync", "proxy"), "t.yaml", warnings)
    assert cfg.auth_service.session_recording == "node"
    assert 't.yaml: auth_service.session_recording: "proxy": Ringfence records on the node; using "node"' in warnings
