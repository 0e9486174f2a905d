"""Typed, frozen configuration loaded from TOML.

Every key has an embedded default, so the daemon runs with no file at all. A
file may set any subset. Unknown keys and bad values are refused with the file,
the dotted key and the reason: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import grp
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import limits as limits_mod
from . import netpolicy
from .metrics import DEFAULT_LISTEN, parse_listen
from .names import SYSCTL_KEY, SYSCTL_VALUE, valid_ifname
from .procscan import COMM_LEN, DEFAULT_HELPERS

DEFAULT_PATH = Path("/etc/nsd/nsd.toml")

_LINK_PREFIX = re.compile(r"[a-z]([a-z0-9]{0,3}[a-z])?")
_RLIMITS = frozenset(
    {"as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
     "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"}
)  # fmt: skip


class ConfigError(Exception):
    """A configuration problem, naming the file and the dotted key."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/nsd/io.nsd.Tenant"
    state_dir: str = "/var/lib/nsd"
    admin_group: str = ""
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    max_connections: int = 512
    max_connections_per_uid: int = 64
    max_message_bytes: int = 65536

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


@dataclass(frozen=True)
class FaultsConfig:
    """``[faults]``: limit hits recorded with a process snapshot (nsd.faultrecord)."""

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
    network: netpolicy.NetworkConfig = field(default_factory=netpolicy.NetworkConfig)
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
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(source, "-", f"cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "-", f"not valid TOML: {e}") from e
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
                sections[name] = netpolicy.config_from_mapping(value)
            except netpolicy.NetworkConfigError as e:
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
            raise ConfigError(source, key, f"must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string, not {value!r}")
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
    except limits_mod.InvalidLimit as e:
        raise ConfigError(source, f"limits.{e.parameters['field']}", e.parameters["reason"]) from e
    return parsed


def _umask(source: str, key: str, value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise ConfigError(source, key, 'must be an octal string such as "0022"')


def _rlimit_value(source: str, key: str, value: Any) -> int | None:
    if value == "infinity":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(source, key, 'must be a non-negative integer or "infinity"')
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
        if not name or len(name.encode()) > COMM_LEN or "/" in name or "\n" in name:
            raise ConfigError(
                source, key,
                f"{name!r} is not a process name as /proc/PID/comm shows it (1-15 bytes, no '/')",
            )  # fmt: skip
    return tuple(dict.fromkeys(value))


_SPECIAL.update({"netns.sysctls": _sysctls, "exec.umask": _umask, "exec.rlimits": _rlimits,
                 "metrics.helpers": _helpers})  # fmt: skip


# ---------------------------------------------------------------------------
# Cross-field validation


def validate(cfg: Config) -> Config:
    _check_systemd(cfg.source, cfg.systemd)
    _check_daemon(cfg.source, cfg.daemon)
    _check_tenants(cfg.source, cfg.tenants)
    _check_netns(cfg.source, cfg.netns)
    _check_ipam(cfg.source, cfg)
    _check_metrics(cfg.source, cfg.metrics)
    _check_faults(cfg.source, cfg.faults)
    return cfg


def _check_daemon(src: str, d: DaemonConfig) -> None:
    if not d.socket.startswith("/"):
        raise ConfigError(src, "daemon.socket", "must be an absolute path")
    if not d.state_dir.startswith("/"):
        raise ConfigError(src, "daemon.state_dir", "must be an absolute path")
    if d.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(src, "daemon.log_level", "must be one of debug, info, warning, error")
    if d.admin_group:
        try:
            grp.getgrnam(d.admin_group)
        except KeyError:
            raise ConfigError(
                src, "daemon.admin_group", f"no group named {d.admin_group!r}"
            ) from None
    if d.shutdown_timeout <= 0:
        raise ConfigError(src, "daemon.shutdown_timeout", "must be positive")
    for key in ("max_connections", "max_connections_per_uid"):
        if getattr(d, key) < 1:
            raise ConfigError(src, f"daemon.{key}", "must be at least 1")
    if not 1024 <= d.max_message_bytes <= 16 * 1024 * 1024:
        raise ConfigError(src, "daemon.max_message_bytes", "must be between 1024 and 16777216")


def _check_faults(src: str, f: FaultsConfig) -> None:
    if not 1 <= f.keep <= 10_000_000:
        raise ConfigError(src, "faults.keep", "must be between 1 and 10000000 faults")
    if not 0 < f.keep_days <= 3650:
        raise ConfigError(src, "faults.keep_days", "must be more than 0 and at most 3650 days")
    if not 0 <= f.processes <= 1000:
        raise ConfigError(src, "faults.processes", "must be between 0 and 1000")
    if not 0 <= f.coalesce <= 3600:
        raise ConfigError(src, "faults.coalesce", "must be between 0 and 3600 seconds")


def _check_metrics(src: str, m: MetricsConfig) -> None:
    try:
        parse_listen(m.listen)
    except ValueError as e:
        raise ConfigError(src, "metrics.listen", str(e)) from None
    if not 1.0 <= m.interval <= 3600.0:
        raise ConfigError(src, "metrics.interval", "must be between 1 and 3600 seconds")


def _check_systemd(src: str, s: SystemdConfig) -> None:
    parent = s.parent_slice
    if (
        not re.fullmatch(r"[A-Za-z0-9_.\\:]+(-[A-Za-z0-9_.\\:]+)*\.slice", parent)
        or parent == "-.slice"
    ):
        raise ConfigError(
            src, "systemd.parent_slice", "must be a slice unit name such as tenant.slice"
        )
    if s.enter_scope not in ("auto", "always", "never"):
        raise ConfigError(src, "systemd.enter_scope", 'must be "auto", "always" or "never"')
    if s.use_pidfds not in ("auto", "never"):
        raise ConfigError(src, "systemd.use_pidfds", 'must be "auto" or "never"')
    if s.call_timeout <= 0:
        raise ConfigError(src, "systemd.call_timeout", "must be positive")


def _check_tenants(src: str, t: TenantsConfig) -> None:
    if not 0 < t.uid_min <= t.uid_max < 2**32 - 1:
        raise ConfigError(
            src, "tenants.uid_max",
            "need 0 < uid_min <= uid_max < 4294967295 (root is never a tenant)",
        )  # fmt: skip
    for key in ("lock_timeout", "stop_timeout"):
        if getattr(t, key) <= 0:
            raise ConfigError(src, f"tenants.{key}", "must be positive")


def _check_netns(src: str, n: NetnsConfig) -> None:
    if not n.run_dir.startswith("/") or n.run_dir.rstrip("/") in ("", "/proc", "/sys"):
        raise ConfigError(
            src, "netns.run_dir", "must be an absolute path of a directory nsd may mount on"
        )
    _check_template(src, n.name_template)
    if not _LINK_PREFIX.fullmatch(n.link_prefix):
        raise ConfigError(
            src, "netns.link_prefix",
            "must be 1-5 lower-case letters/digits starting with a letter and not ending in a "
            "digit (prefix + up to 10 UID digits must fit the 15-byte interface name limit)",
        )  # fmt: skip
    if not valid_ifname(n.tenant_interface) or n.tenant_interface in ("lo", "all", "default"):
        raise ConfigError(src, "netns.tenant_interface", "not a valid interface name")
    if n.mtu and not 1280 <= n.mtu <= 65535:
        raise ConfigError(
            src, "netns.mtu", "must be 0 (kernel default) or 1280-65535 (IPv6 needs 1280)"
        )


def _check_template(src: str, template: str) -> None:
    key = "netns.name_template"
    fields_used = set(re.findall(r"\{([^{}]*)\}", template))
    if not fields_used & {"user", "uid"}:
        raise ConfigError(src, key, "must contain {user} or {uid}, or names would collide")
    if fields_used - {"user", "uid"}:
        raise ConfigError(src, key, f"unknown fields {sorted(fields_used - {'user', 'uid'})}")
    sample = template.format(user="a", uid=1)
    if "/" in sample or sample in (".", ".."):
        raise ConfigError(src, key, "must give a plain file name (no '/')")
    # Injective: user names and UIDs are each unique, so the name must change
    # when either does ("{{user}}" is a literal and would not).
    if sample == template.format(user="b", uid=1) and sample == template.format(user="a", uid=2):
        raise ConfigError(src, key, "gives the same name for every user")


def _check_ipam(src: str, cfg: Config) -> None:
    i = cfg.ipam
    if i.strategy not in ("pool", "uid"):
        raise ConfigError(src, "ipam.strategy", 'must be "pool" or "uid"')
    try:
        net4 = ipaddress.IPv4Network(i.ipv4_pool)
    except ValueError as e:
        raise ConfigError(src, "ipam.ipv4_pool", f"not an IPv4 network: {e}") from e
    if net4.prefixlen > 30:
        raise ConfigError(src, "ipam.ipv4_pool", "too small (need at least a /30)")
    try:
        gw = i.ipv4_gateway_address
    except ValueError as e:
        raise ConfigError(src, "ipam.ipv4_gateway", f"not an IPv4 address: {e}") from e
    if gw not in net4 or gw in (net4.network_address, net4.broadcast_address):
        raise ConfigError(src, "ipam.ipv4_gateway", f"must be a host address inside {net4}")
    if i.ipv6_prefix:
        try:
            net6 = ipaddress.IPv6Network(i.ipv6_prefix)
        except ValueError as e:
            raise ConfigError(src, "ipam.ipv6_prefix", f"not an IPv6 network: {e}") from e
        if net6.prefixlen > 56:
            raise ConfigError(
                src, "ipam.ipv6_prefix", "must be /56 or shorter (one /64 per tenant)"
            )
    try:
        gw6 = ipaddress.IPv6Address(i.ipv6_gateway)
    except ValueError as e:
        raise ConfigError(src, "ipam.ipv6_gateway", f"not an IPv6 address: {e}") from e
    if not gw6.is_link_local:
        raise ConfigError(src, "ipam.ipv6_gateway", "must be link-local (fe80::/10)")
    if i.quarantine_seconds < 0:
        raise ConfigError(src, "ipam.quarantine_seconds", "must not be negative")
    if i.strategy == "uid":
        _check_uid_strategy(src, cfg, net4)


def _check_uid_strategy(src: str, cfg: Config, net4: ipaddress.IPv4Network) -> None:
    i, t = cfg.ipam, cfg.tenants
    if t.uid_min < i.uid_offset:
        raise ConfigError(src, "ipam.uid_offset", "must not exceed tenants.uid_min")
    span = t.uid_max - i.uid_offset
    if span >= net4.num_addresses - 1:
        raise ConfigError(
            src,
            "ipam.ipv4_pool",
            f"too small for uid strategy: uids up to {t.uid_max} need offset {span} inside {net4}",
        )
    if span > 0xFFFF:
        raise ConfigError(
            src,
            "tenants.uid_max",
            "uid strategy encodes uid - uid_offset in the 16-bit IPv6 subnet id; "
            "the range is too wide",
        )
