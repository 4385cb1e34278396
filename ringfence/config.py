"""The node configuration file (YAML), modelled on the seed's teleport.yaml.

    cluster_name: main
    nodename: web-1
    data_dir: /var/lib/ringfence
    nats_url: nats://127.0.0.1:4222
    ssh_service:
      enhanced_recording:
        enabled: false
        cgroup_path: ""          # empty: use the host's cgroup2 mount
      restricted_session:
        enabled: true
        restricted_logins: sessions   # or none, or [alice, bob]: judged outside sessions too
    auth_service:                 # read by the policy service: cluster-wide settings from the file
      authentication:
        locking_mode: strict      # cluster_auth_preference (`ringfence get cap`)
      session_recording: node     # session_recording_config: node, node-sync or off
      client_idle_timeout: 15m    # cluster_networking_config
    operator_auth: required       # or off: accept unsigned control requests (tests, migration)
    nats_nkey: /path/to/seed.nk   # NATS nkey seed this process connects with (default: none)
    nats_replicas: 1              # copies of every stream and bucket: 1, or 3/5 on a NATS cluster
    nats_tls_ca: /path/ca.pem     # CA that signed the NATS server's certificate (tls:// URLs)
    metrics_listen: ""            # HOST:PORT to serve Prometheus /metrics on (default: off)
    node_auth_issuer: ""          # policy service: account nkey seed signing joined nodes' credentials
    nats_system_nkey: ""          # policy service: NATS system-account seed, to cut off a removed node
    audit:
      retention: 90d              # daily log files, their index rows and recordings; empty: keep all

The original's teleport.yaml is read too (ringfence/teleport_yaml.py maps it).

Precedence: command-line flag, then environment (RINGFENCE_*), then the file
(--config, RINGFENCE_CONFIG, or /etc/ringfence.yaml when present), then the
defaults below. An unknown key or a bad value is an error naming both.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import msgspec
from msgspec import Struct, field

from . import teleport_yaml
from .contract.strict import DecodeError, convert

DEFAULT_CONFIG_PATH = "/etc/ringfence.yaml"
DEFAULT_DATA_DIR = "/var/lib/ringfence"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_CLUSTER_NAME = "ringfence"

ENV_CONFIG = "RINGFENCE_CONFIG"
ENV_DATA_DIR = "RINGFENCE_DATA_DIR"
ENV_NATS_URL = "RINGFENCE_NATS_URL"
ENV_NODENAME = "RINGFENCE_NODENAME"
ENV_OPERATOR_AUTH = "RINGFENCE_OPERATOR_AUTH"
ENV_NATS_NKEY = "RINGFENCE_NATS_NKEY"
ENV_NATS_REPLICAS = "RINGFENCE_NATS_REPLICAS"
ENV_CONFIG_WARNED = "RINGFENCE_CONFIG_WARNED"  # set by `ringfence up` for its children: it printed the warnings
ENV_NATS_TLS_CA = "RINGFENCE_NATS_TLS_CA"
ENV_METRICS_LISTEN = "RINGFENCE_METRICS_LISTEN"
ENV_NODE_AUTH_ISSUER = "RINGFENCE_NODE_AUTH_ISSUER"
ENV_NATS_SYSTEM_NKEY = "RINGFENCE_NATS_SYSTEM_NKEY"

OPERATOR_AUTH_MODES = ("required", "off")
LOCKING_MODES = ("best_effort", "strict")
RECORDING_MODES = ("node", "node-sync", "off")
NATS_REPLICAS = (1, 3, 5)  # JetStream replication: a quorum needs an odd count

NODENAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_NODENAME = re.compile(f"^{NODENAME_PATTERN}$")


class ConfigError(ValueError):
    pass


class EnhancedRecording(Struct, forbid_unknown_fields=True):
    enabled: bool = False
    # Where cgroup v2 is mounted. Empty: detect the host's mount; a path: use the
    # cgroup2 mounted there, mounting it first when nothing is.
    cgroup_path: str = ""
    # Ring buffer size per event class, in KiB (a power of two, >= 4).
    ring_buffer_kib: int = 4096


RESTRICTED_LOGINS_MODES = ("sessions", "none")


class RestrictedSession(Struct, forbid_unknown_fields=True):
    enabled: bool = True
    # Logins whose processes obey the policy outside sessions too (cron, at,
    # systemd user units, leftovers): "sessions" (every login that has had a
    # Ringfence session on this node, except root), "none", or a list of logins.
    restricted_logins: str | list[str] = "sessions"


class SSHService(Struct, forbid_unknown_fields=True):
    enabled: bool = True
    enhanced_recording: EnhancedRecording = field(default_factory=EnhancedRecording)
    restricted_session: RestrictedSession = field(default_factory=RestrictedSession)
    # How long a connection lease (max_connections) of a node that died keeps counting.
    connection_lease_ttl: str = "30s"
    # Bytes of a remote command's stdin kept in its recording (the rest is counted).
    record_stdin_bytes: int = 65536
    # Certificates name the Ringfence user (their key ID) only when signed by a CA
    # listed in this file (one public key per line, like sshd's TrustedUserCAKeys).
    # Empty: certificate key IDs are never trusted.
    trusted_user_ca_keys: str = ""
    # Refuse SSH logins whose key no Ringfence user registered (and no trusted
    # certificate names). Off: such a login's user is its login name.
    require_registered_identity: bool = False


class Authentication(Struct, forbid_unknown_fields=True):
    locking_mode: str = ""  # best_effort or strict; "": the cluster_auth_preference resource decides


class AuthService(Struct, forbid_unknown_fields=True):
    """Cluster-wide settings fixed by the file, as the original's auth_service. The policy service
    writes them as resources (marked as coming from the config file) when it starts; `create -f`
    and `rm` cannot change them meanwhile. Empty: the resources are managed with `create -f`."""

    authentication: Authentication = field(default_factory=Authentication)
    session_recording: str = ""  # node, node-sync or off; "": the session_recording_config resource decides
    client_idle_timeout: str = ""


class AuditSettings(Struct, forbid_unknown_fields=True):
    # How long the audit service keeps daily log files (with their index rows) and
    # session recordings: a Go-style duration of at least 1d, e.g. "90d". Empty: for ever.
    retention: str = ""

    @property
    def retention_seconds(self) -> float:
        from .durations import parse_duration

        return parse_duration(self.retention) if self.retention else 0.0


class Config(Struct, forbid_unknown_fields=True):
    cluster_name: str = DEFAULT_CLUSTER_NAME
    nodename: str = ""
    data_dir: str = DEFAULT_DATA_DIR
    # One URL or several, comma-separated (the seed servers of a NATS cluster).
    nats_url: str = DEFAULT_NATS_URL
    # Locks: how long a lock view may go without being confirmed current before
    # strict-mode sessions are locked out (Go-style duration).
    lock_view_max_staleness: str = "30s"
    ssh_service: SSHService = field(default_factory=SSHService)
    auth_service: AuthService = field(default_factory=AuthService)
    # Control requests: "required" (signed by a registered operator identity and
    # allowed by the user's roles) or "off" (accepted unsigned, as before).
    operator_auth: str | bool = "required"  # YAML reads a bare off/on as a bool: accepted
    # Path of the NATS nkey seed this process connects with; empty: no NATS credentials.
    nats_nkey: str = ""
    # Copies JetStream keeps of every stream and KV bucket: 1 (one server), or 3 or 5
    # on a NATS cluster of at least that many servers. Services raise existing
    # streams to it; they never lower it.
    nats_replicas: int = 1
    # CA certificate (PEM) the NATS server's TLS certificate must chain to; empty: the system's CAs.
    nats_tls_ca: str = ""
    # HOST:PORT where this process serves Prometheus metrics at /metrics; empty: none.
    metrics_listen: str = ""
    # Policy service only. The account nkey seed (SA...) that signs joined nodes' NATS user JWTs
    # (auth callout); empty: nodes cannot join through this service.
    node_auth_issuer: str = ""
    # Policy service only. A NATS system-account user seed: disconnects a removed node at once.
    nats_system_nkey: str = ""
    audit: AuditSettings = field(default_factory=AuditSettings)

    @property
    def nats_urls(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


def _validate(cfg: Config, source: str) -> None:
    if not cfg.nodename:
        cfg.nodename = socket.gethostname().split(".")[0] or "localhost"
    if not _NODENAME.match(cfg.nodename):
        raise ConfigError(
            f'{source}: nodename: "{cfg.nodename}": use letters, digits, ".", "_" or "-" (at most 63)'
        )
    if not cfg.data_dir or not os.path.isabs(cfg.data_dir):
        raise ConfigError(f'{source}: data_dir: "{cfg.data_dir}": must be an absolute path')
    cg = cfg.ssh_service.enhanced_recording.cgroup_path
    if cg and not os.path.isabs(cg):
        raise ConfigError(
            f'{source}: ssh_service.enhanced_recording.cgroup_path: "{cg}": must be an absolute path'
        )
    kib = cfg.ssh_service.enhanced_recording.ring_buffer_kib
    if kib < 4 or kib & (kib - 1):
        raise ConfigError(
            f"{source}: ssh_service.enhanced_recording.ring_buffer_kib: {kib}: "
            "must be a power of two of at least 4"
        )
    logins = cfg.ssh_service.restricted_session.restricted_logins
    if isinstance(logins, str) and logins not in RESTRICTED_LOGINS_MODES:
        raise ConfigError(
            f'{source}: ssh_service.restricted_session.restricted_logins: "{logins}": use '
            f'{" or ".join(RESTRICTED_LOGINS_MODES)}, or a list of logins'
        )
    for login in logins if isinstance(logins, list) else []:
        if not login or login == "root" or any(c in login for c in ":/\n"):
            raise ConfigError(
                f'{source}: ssh_service.restricted_session.restricted_logins: "{login}": not a login that '
                "can be restricted (root never is: the enforcer and the host run as root)"
            )
    for url in cfg.nats_urls or [""]:
        if not re.match(r"^(nats|tls|ws|wss)://[^\s]+$", url):
            raise ConfigError(f'{source}: nats_url: "{url}": expected nats://host:port')
    if isinstance(cfg.operator_auth, bool):
        cfg.operator_auth = "required" if cfg.operator_auth else "off"
    if cfg.operator_auth not in OPERATOR_AUTH_MODES:
        raise ConfigError(
            f'{source}: operator_auth: "{cfg.operator_auth}": use {" or ".join(OPERATOR_AUTH_MODES)}'
        )
    if cfg.nats_replicas not in NATS_REPLICAS:
        raise ConfigError(
            f"{source}: nats_replicas: {cfg.nats_replicas}: use {', '.join(map(str, NATS_REPLICAS))}"
        )
    for key in ("nats_nkey", "nats_tls_ca", "node_auth_issuer", "nats_system_nkey"):
        value = getattr(cfg, key)
        if value and not os.path.isabs(value):
            setattr(cfg, key, os.path.abspath(value))
    if cfg.metrics_listen:
        try:
            parse_listen(cfg.metrics_listen)
        except ValueError as exc:
            raise ConfigError(f"{source}: metrics_listen: {exc}") from None
    from .durations import parse_duration

    durations = {
        "lock_view_max_staleness": cfg.lock_view_max_staleness,
        "ssh_service.connection_lease_ttl": cfg.ssh_service.connection_lease_ttl,
    }
    for key, text in durations.items():
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
        if seconds < 1:
            raise ConfigError(f'{source}: {key}: "{text}" is shorter than 1s')
    choices = {"auth_service.authentication.locking_mode": (cfg.auth_service.authentication.locking_mode,
                                                            LOCKING_MODES),
               "auth_service.session_recording": (cfg.auth_service.session_recording, RECORDING_MODES)}
    for key, (value, allowed) in choices.items():
        if value and value not in allowed:
            raise ConfigError(f'{source}: {key}: "{value}": use {" or ".join(allowed)}')
    if cfg.auth_service.client_idle_timeout:
        try:
            parse_duration(cfg.auth_service.client_idle_timeout)
        except ValueError as exc:
            raise ConfigError(f"{source}: auth_service.client_idle_timeout: {exc}") from None
    if cfg.audit.retention:
        try:
            seconds = parse_duration(cfg.audit.retention)
        except ValueError as exc:
            raise ConfigError(f"{source}: audit.retention: {exc}") from None
        if seconds < 86400:
            raise ConfigError(f'{source}: audit.retention: "{cfg.audit.retention}" is shorter than 1d '
                              "(the log is kept in whole days); use e.g. 90d, or leave it empty to keep everything")


def parse_config(text: str, source: str, warnings: list[str] | None = None) -> Config:
    """The config in `text`; a teleport.yaml is translated first, and what it ignores is
    appended to `warnings` (one line each)."""
    import yaml  # here: most runs have no config file, and the CLI starts faster without it

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(doc).__name__}")
    if teleport_yaml.is_teleport_yaml(doc):
        try:
            doc, ignored = teleport_yaml.translate(doc)
        except teleport_yaml.Problem as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if warnings is not None:
            warnings += [f"{source}: {line}" for line in ignored]
    try:
        return convert(doc, Config)
    except DecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(
    path: str | None = None,
    *,
    data_dir: str | None = None,
    nats_url: str | None = None,
    nodename: str | None = None,
    nats_nkey: str | None = None,
    nats_replicas: int | None = None,
    warnings: list[str] | None = None,
    metrics_listen: str | None = None,
) -> Config:
    """Load the configuration with flag > environment > file > default precedence; what a
    teleport.yaml sets that Ringfence ignores is appended to `warnings`."""
    path = path or os.environ.get(ENV_CONFIG) or None
    if path is None and Path(DEFAULT_CONFIG_PATH).exists():
        path = DEFAULT_CONFIG_PATH
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        cfg = parse_config(text, path, warnings)
    else:
        cfg = Config()
    source = path or "(defaults)"
    overrides = {
        "data_dir": data_dir or os.environ.get(ENV_DATA_DIR),
        "nats_url": nats_url or os.environ.get(ENV_NATS_URL),
        "nodename": nodename or os.environ.get(ENV_NODENAME),
        "nats_nkey": nats_nkey or os.environ.get(ENV_NATS_NKEY),
        "operator_auth": os.environ.get(ENV_OPERATOR_AUTH),
        "nats_tls_ca": os.environ.get(ENV_NATS_TLS_CA),
        "metrics_listen": metrics_listen or os.environ.get(ENV_METRICS_LISTEN),
        "node_auth_issuer": os.environ.get(ENV_NODE_AUTH_ISSUER),
        "nats_system_nkey": os.environ.get(ENV_NATS_SYSTEM_NKEY),
    }
    mode = overrides["operator_auth"]
    if mode and mode not in OPERATOR_AUTH_MODES:
        raise ConfigError(f'{ENV_OPERATOR_AUTH}: "{mode}": use {" or ".join(OPERATOR_AUTH_MODES)}')
    for key, value in overrides.items():
        if value:
            setattr(cfg, key, value)
    replicas = nats_replicas or _env_replicas()
    if replicas:
        cfg.nats_replicas = replicas
    _validate(cfg, source)
    return cfg


def _env_replicas() -> int | None:
    text = os.environ.get(ENV_NATS_REPLICAS, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) not in NATS_REPLICAS:
        raise ConfigError(f'{ENV_NATS_REPLICAS}: "{text}": use {", ".join(map(str, NATS_REPLICAS))}')
    return int(text)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT of a listener (IPv6 as [::1]:3080); ValueError naming the value otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'"{text}" is not HOST:PORT (e.g. 127.0.0.1:3080)')
    return host, int(port)


def listen_argument(text: str) -> str:
    """An argparse type for --listen-style flags: HOST:PORT, checked with parse_listen."""
    import argparse  # only command lines need it

    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def dump_config(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False)
