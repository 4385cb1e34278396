"""The original's teleport.yaml as a Ringfence config. Pure.

A migrating node keeps its /etc/teleport.yaml: `ringfence up --config
/etc/teleport.yaml`. What means something on an OpenSSH fleet maps onto
Ringfence's settings; what does not is ignored with one warning per reason
naming the keys (a section for another protocol: one warning per section).
A key neither Ringfence nor the original knows stays an error, so typos are
still caught; a bad value of a mapped key is an error naming key and value.

    teleport.nodename, teleport.data_dir     -> nodename, data_dir
    auth_service.cluster_name                -> cluster_name
    auth_service.authentication.locking_mode -> auth_service.authentication.locking_mode (`get cap`)
    auth_service.session_recording           -> auth_service.session_recording (node, node-sync, off)
    auth_service.client_idle_timeout         -> auth_service.client_idle_timeout (`get networking`)
    ssh_service.enhanced_recording.*, ssh_service.restricted_session.enabled -> the same keys
"""

from __future__ import annotations

from typing import Any

# Top-level keys only the original has; their presence marks a file as a teleport.yaml.
MARKERS = ("teleport", "version", "auth_service", "proxy_service")

CONFIG_VERSIONS = ("v1", "v2", "v3")

# Sections for what Ringfence does not do: ignored, one warning each.
OTHER_SECTIONS = {
    "proxy_service": "Ringfence has no proxy: clients reach each node's sshd directly",
    "kubernetes_service": "Ringfence controls OpenSSH sessions, not Kubernetes",
    "kube_service": "Ringfence controls OpenSSH sessions, not Kubernetes",
    "db_service": "Ringfence controls OpenSSH sessions, not databases",
    "app_service": "Ringfence controls OpenSSH sessions, not web applications",
    "windows_desktop_service": "Ringfence controls OpenSSH sessions, not Windows desktops",
    "metrics_service": "Ringfence has no metrics service; `ringfence status --stats` shows its counters",
    "tracing_service": "Ringfence has no tracing service",
    "discovery_service": "Ringfence nodes are the hosts running an enforcer; nothing is discovered",
    "jamf_service": "Ringfence has no device inventory",
    "okta_service": "Ringfence has no identity provider integration",
    "debug_service": "Ringfence has no debug service",
}

_JOIN = "Ringfence nodes connect to NATS (nats_url, nats_nkey), not to the original's auth server"
_STATE = "Ringfence keeps its state in NATS JetStream"
_SSHD = "sshd serves SSH here: set it in sshd_config"
_LABELS = "labels select nodes in the original's roles (node_labels); Ringfence's roles do not select nodes"
_LOG = "services log to stderr; set the level with --log-level or RINGFENCE_LOG_LEVEL"
_CONN_LIMITS = ("the original's per-address connection limits of its own SSH server: on OpenSSH use "
                "MaxStartups and PerSourceMaxStartups in sshd_config; concurrent connections per user are "
                "the role option max_connections")
_AUTH = "who may log in is decided by sshd (keys, TrustedUserCAKeys), not by Ringfence"
_PROXY_ONLY = "only the original's proxy used it"
_NOT_HERE = "the original's auth server alone used it"
_BUFFERS = ("Ringfence sizes its ring buffers with ssh_service.enhanced_recording.ring_buffer_kib "
            "(one ring buffer per event class, shared by all CPUs)")

# Keys of the sections Ringfence reads that mean nothing here, and why (the warning).
IGNORED = {
    "teleport": {
        "auth_token": _JOIN, "join_params": _JOIN, "auth_servers": _JOIN, "auth_server": _JOIN,
        "proxy_server": _JOIN, "ca_pin": _JOIN, "advertise_ip": _JOIN,
        "log": _LOG, "pid_file": "Ringfence writes no pid file",
        "storage": _STATE, "cache": _STATE,
        "connection_limits": _CONN_LIMITS,
        "ciphers": _SSHD, "kex_algos": _SSHD, "mac_algos": _SSHD, "ca_signature_algo": _SSHD,
        "ciphersuites": _JOIN, "diag_addr": "Ringfence has no diagnostics address; see `ringfence status --stats`",
        "seed_config": _NOT_HERE, "fips": _NOT_HERE,
    },
    "auth_service": {
        "enabled": "every `ringfence up` runs all four services (choose with --services)",
        "listen_addr": _JOIN, "public_addr": _JOIN, "tokens": _JOIN, "proxy_protocol": _JOIN,
        "license_file": _NOT_HERE, "reverse_tunnels": _NOT_HERE, "kubeconfig_file": _NOT_HERE,
        "ca_key_params": _NOT_HERE, "message_of_the_day": _NOT_HERE, "routing_strategy": _NOT_HERE,
        "tunnel_strategy": _NOT_HERE, "proxy_listener_mode": _PROXY_ONLY, "proxy_checks_host_keys": _PROXY_ONLY,
        "web_idle_timeout": _PROXY_ONLY, "disconnect_expired_cert": _AUTH,
        "keep_alive_interval": _SSHD + " (ClientAliveInterval)",
        "keep_alive_count_max": _SSHD + " (ClientAliveCountMax)",
        "session_control_timeout": "Ringfence's counterpart is lock_view_max_staleness",
        "client_idle_timeout_message": "Ringfence shows the original's own idle message",
        "access_monitoring": _NOT_HERE, "assist": _NOT_HERE,
    },
    "authentication": {
        "type": _AUTH, "second_factor": _AUTH, "connector_name": _AUTH, "u2f": _AUTH, "webauthn": _AUTH,
        "require_session_mfa": _AUTH, "local_auth": _AUTH, "passwordless": _AUTH, "headless": _AUTH,
        "private_key_policy": _AUTH, "device_trust": _AUTH, "default_session_ttl": _AUTH,
        "hardware_key": _AUTH, "signature_algorithm_suite": _AUTH,
    },
    "ssh_service": {
        "listen_addr": _SSHD, "public_addr": _SSHD, "labels": _LABELS, "commands": _LABELS, "pam": _SSHD,
        "permit_user_env": _SSHD, "port_forwarding": _SSHD, "x11": _SSHD, "ssh_file_copy": _SSHD,
        "disable_create_host_user": _SSHD, "namespace": _SSHD, "aws": _SSHD, "force_listen": _SSHD,
    },
    "enhanced_recording": {"command_buffer_size": _BUFFERS, "disk_buffer_size": _BUFFERS,
                           "network_buffer_size": _BUFFERS},
    "restricted_session": {"events_buffer_size": _BUFFERS},
}

# The original accepts yes/no/true/false (any case) and 1/0 for `enabled`.
_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
RECORDING_MODES = {"node": "node", "node-sync": "node-sync", "off": "off", "proxy": "node", "proxy-sync": "node-sync"}


class Problem(ValueError):
    """A value of a mapped key that cannot be used; str() names the key and the value."""


def is_teleport_yaml(doc: dict[str, Any]) -> bool:
    return any(key in doc for key in MARKERS)


def _bool(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    return value  # strict decoding names anything else


def _split(section: Any, name: str, path: str, ignored: dict[str, list[str]]) -> dict[str, Any]:
    """`section` without the keys IGNORED[name] lists, which go into `ignored` (reason -> paths)."""
    if not isinstance(section, dict):
        return section  # strict decoding names it
    kept = {}
    for key, value in section.items():
        reason = IGNORED.get(name, {}).get(key) if isinstance(key, str) else None
        if reason is None:
            kept[key] = value
        elif value not in (None, "", [], {}):
            ignored.setdefault(reason, []).append(f"{path}.{key}")
    return kept


def translate(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A teleport.yaml as a Ringfence config document, and the warnings about what it ignored."""
    out = dict(doc)
    ignored: dict[str, list[str]] = {}
    warnings: list[str] = []
    version = out.pop("version", "v1")
    if version not in CONFIG_VERSIONS:
        raise Problem(f'version: "{version}": expected one of {", ".join(CONFIG_VERSIONS)} (the original\'s '
                      "config versions)")
    for name, reason in OTHER_SECTIONS.items():
        section = out.pop(name, None)
        if section is not None and section not in ({"enabled": False}, {"enabled": "no"}, {"enabled": "false"}):
            warnings.append(f"{name}: ignored: {reason}")
    teleport = _split(out.pop("teleport", None) or {}, "teleport", "teleport", ignored)
    if isinstance(teleport, dict):
        for key, value in teleport.items():
            if key in out and out[key] != value:
                raise Problem(f"teleport.{key}: {value!r} and {key}: {out[key]!r} disagree; keep one")
            out[key] = value
    if "auth_service" in out:
        auth = _split(out["auth_service"], "auth_service", "auth_service", ignored)
        if isinstance(auth, dict):
            if "cluster_name" in auth:
                out.setdefault("cluster_name", auth.pop("cluster_name"))
            if "authentication" in auth:
                auth["authentication"] = _split(auth["authentication"], "authentication",
                                                "auth_service.authentication", ignored)
            mode = auth.get("session_recording")
            if isinstance(mode, str) and mode in RECORDING_MODES and RECORDING_MODES[mode] != mode:
                warnings.append(f'auth_service.session_recording: "{mode}": Ringfence records on the node; '
                                f'using "{RECORDING_MODES[mode]}"')
                auth["session_recording"] = RECORDING_MODES[mode]
        out["auth_service"] = auth
    if "ssh_service" in out:
        ssh = _split(out["ssh_service"], "ssh_service", "ssh_service", ignored)
        if isinstance(ssh, dict):
            if "enabled" in ssh:
                ssh["enabled"] = _bool(ssh["enabled"])
            for sub in ("enhanced_recording", "restricted_session"):
                part = _split(ssh.get(sub), sub, f"ssh_service.{sub}", ignored)
                if isinstance(part, dict) and "enabled" in part:
                    part["enabled"] = _bool(part["enabled"])
                if sub in ssh:
                    ssh[sub] = part
        out["ssh_service"] = ssh
    warnings += [f"{', '.join(paths)}: ignored: {reason}" for reason, paths in ignored.items()]
    return out, warnings
