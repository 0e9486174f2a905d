"""Typed, frozen configuration loaded from TOML.

Every key has an embedded default, so the daemon runs with no file at all. A
file may set any subset. Unknown keys and bad values are refused with the file,
the dotted key and the reason: a typo must never silently fall back to a default.
What every value is checked against (bounds, cross-field rules) is in
nsd.config_check; this module reads the file into the typed sections.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nsd import limits as limits_mod
from nsd import names, network_config
from nsd.config_check import ConfigError, in_bounds, show, validate
from nsd.errors import InvalidLimit
from nsd.names import COMM_LEN, DEFAULT_HELPERS, SYSCTL_KEY, SYSCTL_VALUE

# ConfigError is defined with the checks (which raise it too) and is part of this
# module's face: callers of load() catch config.ConfigError.
__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_PATH",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "ExecConfig",
    "FaultsConfig",
    "IpamConfig",
    "MetricsConfig",
    "NetnsConfig",
    "ResourceLimit",
    "SystemdConfig",
    "TenantsConfig",
    "from_bytes",
    "from_mapping",
    "load",
]

#: Where the metrics exporter listens unless metrics.listen says otherwise.
DEFAULT_LISTEN = "127.0.0.1:9917"

DEFAULT_PATH = Path("/etc/nsd/nsd.toml")

_RLIMITS = frozenset(
    {"as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
     "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"}
)  # fmt: skip
_RLIMIT_MAX = 2**63 - 1  # setrlimit() takes an rlim_t; Python passes it as a signed 64-bit


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/nsd/io.nsd.Tenant"
    state_dir: str = "/var/lib/nsd"
    admin_group: str = ""
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    # The connection policy (docs/configuration.md gives the reasoning; the
    # varlink server's Limits carry the same defaults).
    max_connections: int = 4096
    reserved_connections: int = 256
    max_connections_per_uid: int = 16
    max_connections_per_non_tenant: int = 2
    max_non_tenant_connections: int = 64
    max_streams_per_uid: int = 4
    idle_timeout: float = 15.0
    call_timeout: float = 45.0
    message_timeout: float = 10.0
    max_message_bytes: int = 65536
    max_queued_output_bytes: int = 16 << 20
    max_queued_output_bytes_per_uid: int = 1 << 20
    # Audit lines of refused calls, per UID: a burst, then this many per second.
    audit_refusal_burst: int = 10
    audit_refusal_rate: float = 1.0

    @property
    def database(self) -> Path:
        return Path(self.state_dir) / "nsd.db"


@dataclass(frozen=True)
class TenantsConfig:
    uid_min: int = 1000
    uid_max: int = 59999
    enter_creates: bool = True
    adopt_existing: bool = False
    lock_timeout: float = 30.0
    stop_timeout: float = 10.0


@dataclass(frozen=True)
class NetnsConfig:
    run_dir: str = "/run/netns"
    name_template: str = "{user}"
    link_prefix: str = "nsd"
    tenant_interface: str = "eth0"
    mtu: int = 0
    sysctls: Mapping[str, str] = field(
        default_factory=lambda: {"net.ipv4.ip_unprivileged_port_start": "0"}
    )


@dataclass(frozen=True)
class IpamConfig:
    strategy: str = "pool"
    ipv4_pool: str = "100.64.0.0/16"
    ipv4_gateway: str = ""
    ipv6_prefix: str = ""
    ipv6_gateway: str = "fe80::1"
    uid_offset: int = 0
    quarantine_seconds: int = 86400
    # How often lease rows whose quarantine has ended are deleted.
    purge_interval: float = 3600.0
    check_host_routes: bool = True

    @property
    def ipv4_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.ipv4_pool)

    @property
    def ipv4_gateway_address(self) -> ipaddress.IPv4Address:
        if self.ipv4_gateway:
            return ipaddress.IPv4Address(self.ipv4_gateway)
        return self.ipv4_network.network_address + 1


@dataclass(frozen=True)
class SystemdConfig:
    slices: bool = True
    parent_slice: str = "tenant.slice"
    enter_scope: str = "auto"
    use_pidfds: str = "auto"
    call_timeout: float = 30.0


@dataclass(frozen=True)
class ResourceLimit:
    soft: int | None  # None: unlimited
    hard: int | None


@dataclass(frozen=True)
class ExecConfig:
    umask: int = 0o022
    rlimits: Mapping[str, ResourceLimit] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = DEFAULT_LISTEN
    interval: float = 15.0
    helpers: tuple[str, ...] = DEFAULT_HELPERS
    # Besides root, the accounts whose connections may read /metrics (metrics_access).
    scrapers: tuple[str, ...] = ("prometheus",)
    # Serve peers whose socket is not on this host (remote scrapers, namespaces).
    allow_remote: bool = False


@dataclass(frozen=True)
class FaultsConfig:
    """``[faults]``: limit hits recorded with a process snapshot (nsd.core.faultrecord)."""

    enabled: bool = True
    #: faults kept in the store at most (the oldest go first)
    keep: int = 10000
    #: days a fault is kept at most
    keep_days: float = 30.0
    #: processes in a fault's snapshot (largest RSS first)
    processes: int = 10
    #: seconds: at most one record per tenant and kind in this time
    coalesce: float = 10.0


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    netns: NetnsConfig = field(default_factory=NetnsConfig)
    ipam: IpamConfig = field(default_factory=IpamConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    systemd: SystemdConfig = field(default_factory=SystemdConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    limits: limits_mod.Limits = field(default_factory=limits_mod.Limits)
    network: network_config.NetworkConfig = field(default_factory=network_config.NetworkConfig)
    source: str = "<defaults>"


# ---------------------------------------------------------------------------
# Loading


def load(path: Path | None = None) -> Config:
    """Load ``path``; with no path, ``/etc/nsd/nsd.toml`` if it exists, else defaults."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return validate(Config())
        path = DEFAULT_PATH
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(source, "-", f"cannot read: {e.strerror}") from e
    return from_bytes(data, source)


def from_bytes(data: bytes, source: str = "<bytes>") -> Config:
    """Parse and validate a whole file's bytes; every problem is a ConfigError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            source, "-", f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line})"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "-", f"not valid TOML: {e}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(source, "-", "not valid TOML: nested too deeply") from None
    return from_mapping(raw, source)


def from_mapping(raw: Mapping[str, Any], source: str = "<mapping>") -> Config:
    sections: dict[str, Any] = {}
    known = {f.name: f for f in fields(Config) if f.name != "source"}
    for name, value in raw.items():
        if name not in known:
            raise ConfigError(source, name, f"unknown section (known: {', '.join(known)})")
        if not isinstance(value, dict):
            raise ConfigError(source, name, "must be a table")
        if name == "network":
            try:
                sections[name] = network_config.config_from_mapping(value)
            except network_config.NetworkConfigError as e:
                raise ConfigError(source, f"network.{e.key}", e.reason) from e
            continue
        sections[name] = (
            _limits(source, value) if name == "limits" else _section(source, name, value)
        )
    return validate(Config(**sections, source=source))


_SPECIAL: dict[str, Callable[[str, str, Any], Any]] = {}
_SECTIONS: dict[str, type[Any]] = {
    "daemon": DaemonConfig,
    "tenants": TenantsConfig,
    "netns": NetnsConfig,
    "ipam": IpamConfig,
    "exec": ExecConfig,
    "systemd": SystemdConfig,
    "metrics": MetricsConfig,
    "faults": FaultsConfig,
}


def _section(source: str, name: str, raw: Mapping[str, Any]) -> Any:
    target = _SECTIONS[name]
    defaults = target()
    values: dict[str, Any] = {}
    known = {f.name for f in fields(target)}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in known:
            raise ConfigError(source, dotted, f"unknown key (known: {', '.join(sorted(known))})")
        special = _SPECIAL.get(dotted)
        if special is not None:
            values[key] = special(source, dotted, value)
        else:
            values[key] = _typed(source, dotted, value, getattr(defaults, key))
    return replace(defaults, **values)


def _typed(source: str, key: str, value: Any, default: Any) -> Any:
    # bool is a subclass of int in Python; TOML keeps them apart, so do we.
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"must be true or false, not {show(value)}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, not {show(value)}")
        return in_bounds(source, key, value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"must be a number, not {show(value)}")
        return float(in_bounds(source, key, value))
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string, not {show(value)}")
        if "\0" in value:
            raise ConfigError(source, key, "must not contain a NUL character")
        return value
    raise ConfigError(source, key, "unsupported value")  # pragma: no cover


def _sysctls(source: str, key: str, value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(source, key, "must be a table of sysctl = value")
    out: dict[str, str] = {}
    for name, v in _flatten(value).items():
        if not SYSCTL_KEY.fullmatch(name):
            raise ConfigError(
                source, f"{key}.{name}", "not a per-namespace sysctl (only net.* keys are allowed)"
            )
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ConfigError(source, f"{key}.{name}", "value must be a string or integer")
        text = str(v)
        if not SYSCTL_VALUE.fullmatch(text):
            raise ConfigError(
                source, f"{key}.{name}", "value must be printable ASCII, at most 256 characters"
            )
        out[name] = text
    return out


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    # TOML users write either "net.ipv4.x" = 1 (quoted key) or nested tables; accept both.
    out: dict[str, Any] = {}
    for k, v in table.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out


def _limits(source: str, raw: Mapping[str, Any]) -> limits_mod.Limits:
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(source, f"limits.{key}", "must be a string or an integer")
    try:
        parsed = limits_mod.from_mapping(raw)
        limits_mod.check_consistent(parsed)
    except InvalidLimit as e:
        raise ConfigError(source, f"limits.{e.parameters['field']}", e.parameters["reason"]) from e
    return parsed


def _umask(source: str, key: str, value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise ConfigError(source, key, 'must be an octal string such as "0022"')


def _rlimit_value(source: str, key: str, value: Any) -> int | None:
    if value == "infinity":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _RLIMIT_MAX:
        raise ConfigError(source, key, f'must be an integer from 0 to {_RLIMIT_MAX}, or "infinity"')
    return value


def _rlimits(source: str, key: str, value: Any) -> Mapping[str, ResourceLimit]:
    if not isinstance(value, dict):
        raise ConfigError(source, key, "must be a table of limit = value or [soft, hard]")
    out: dict[str, ResourceLimit] = {}
    for name, v in value.items():
        dotted = f"{key}.{name}"
        if name not in _RLIMITS:
            raise ConfigError(
                source, dotted, f"unknown limit (known: {', '.join(sorted(_RLIMITS))})"
            )
        if isinstance(v, list):
            if len(v) != 2:
                raise ConfigError(source, dotted, "must be [soft, hard]")
            soft, hard = (_rlimit_value(source, dotted, x) for x in v)
        else:
            soft = hard = _rlimit_value(source, dotted, v)
        if hard is not None and (soft is None or soft > hard):
            raise ConfigError(source, dotted, "soft limit exceeds hard limit")
        out[name] = ResourceLimit(soft, hard)
    return out


def _helpers(source: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, key, 'must be a list of process names, e.g. ["(sd-pam)", "su"]')
    for name in value:
        if not name or len(name.encode()) > COMM_LEN or "/" in name or "\n" in name or "\0" in name:
            raise ConfigError(
                source, key,
                f"{name!r} is not a process name as /proc/PID/comm shows it (1-15 bytes, no '/')",
            )  # fmt: skip
    return tuple(dict.fromkeys(value))


def _scrapers(source: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, key, 'must be a list of user names, e.g. ["prometheus"]')
    for name in value:
        reason = names.check_user_name(name)
        if reason is not None:
            raise ConfigError(source, key, f"{name!r}: {reason}")
    return tuple(dict.fromkeys(value))


_SPECIAL.update({"netns.sysctls": _sysctls, "exec.umask": _umask, "exec.rlimits": _rlimits,
                 "metrics.helpers": _helpers, "metrics.scrapers": _scrapers})  # fmt: skip
