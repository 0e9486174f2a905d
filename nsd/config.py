"""Typed, frozen configuration loaded from TOML.

Every key has an embedded default, so the daemon runs with no file at all. A
file may set any subset. Unknown keys and bad values are refused with the file,
the dotted key and the reason: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nsd import limits as limits_mod
from nsd import names
from nsd import network_config as policy_config
from nsd.errors import InvalidLimit
from nsd.names import COMM_LEN, DEFAULT_HELPERS, MAX_UID, SYSCTL_KEY, SYSCTL_VALUE, valid_ifname

#: Where the metrics exporter listens unless metrics.listen says otherwise.
DEFAULT_LISTEN = "127.0.0.1:9917"

DEFAULT_PATH = Path("/etc/nsd/nsd.toml")

_LINK_PREFIX = re.compile(r"[a-z]([a-z0-9]{0,3}[a-z])?")
_RLIMITS = frozenset(
    {"as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
     "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"}
)  # fmt: skip
_RLIMIT_MAX = 2**63 - 1  # setrlimit() takes an rlim_t; Python passes it as a signed 64-bit
_TIMEOUT = (0.1, 3600.0)
#: Every number in the file, with its bounds (inclusive; docs/configuration.md lists
#: them). Checked when the value is read, so nothing can overflow or be NaN later:
#: asyncio times out at once on a NaN, SQLite stores signed 64-bit integers.
BOUNDS: dict[str, tuple[float, float]] = {
    "daemon.shutdown_timeout": _TIMEOUT,
    "daemon.max_connections": (1, 65536),
    "daemon.max_connections_per_uid": (1, 65536),
    "daemon.max_message_bytes": (1024, 16 * 1024 * 1024),
    "daemon.reserved_connections": (0, 65536),  # and below max_connections
    "daemon.max_connections_per_non_tenant": (1, 65536),
    "daemon.max_non_tenant_connections": (1, 65536),
    "daemon.max_streams_per_uid": (1, 65536),
    "daemon.idle_timeout": _TIMEOUT,
    "daemon.call_timeout": _TIMEOUT,
    "daemon.message_timeout": _TIMEOUT,
    "daemon.max_queued_output_bytes": (1024, 1 << 30),
    "daemon.max_queued_output_bytes_per_uid": (1024, 1 << 30),
    "daemon.audit_refusal_burst": (1, 1_000_000),
    "daemon.audit_refusal_rate": (0.001, 1_000_000.0),
    "ipam.purge_interval": (1.0, 86400.0),
    "tenants.uid_min": (0, MAX_UID),  # 0: refused below, with the reason
    "tenants.uid_max": (1, MAX_UID),
    "tenants.lock_timeout": _TIMEOUT,
    "tenants.stop_timeout": _TIMEOUT,
    "netns.mtu": (0, 65535),
    "ipam.uid_offset": (0, MAX_UID),
    "ipam.quarantine_seconds": (0, 10 * 366 * 86400),
    "systemd.call_timeout": _TIMEOUT,
    "metrics.interval": (1.0, 3600.0),
    "faults.keep": (1, 10_000_000),
    "faults.keep_days": (0, 3650),  # and more than 0: _check_faults
    "faults.processes": (0, 1000),
    "faults.coalesce": (0, 3600),
}
# A Unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL).
_SUN_PATH_MAX = 107
_PATH_MAX = 4095
_NAME_MAX = 255  # bytes of one file name (the namespace file)
# The longest values the template's fields can take: user names are checked to be
# at most 32 characters (names.check_user_name); a UID has at most 10 digits.
_TEMPLATE_FIELDS = {"user": 32, "uid": 10}


class ConfigError(Exception):
    """A configuration problem, naming the file and the dotted key."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        # One line whatever the file held: a quoted TOML key may contain a newline.
        shown = [_one_line(part, 200) for part in (source, key)]
        super().__init__(f"{shown[0]}: {shown[1]}: {_one_line(reason, 1000)}")
        self.source = source
        self.key = key
        self.reason = reason


def _one_line(text: str, limit: int) -> str:
    """``text`` with control characters escaped, shortened to about ``limit``."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


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
    network: policy_config.NetworkConfig = field(default_factory=policy_config.NetworkConfig)
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
                sections[name] = policy_config.config_from_mapping(value)
            except policy_config.NetworkConfigError as e:
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
            raise ConfigError(source, key, f"must be true or false, not {_show(value)}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, not {_show(value)}")
        return _in_bounds(source, key, value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"must be a number, not {_show(value)}")
        return float(_in_bounds(source, key, value))
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string, not {_show(value)}")
        if "\0" in value:
            raise ConfigError(source, key, "must not contain a NUL character")
        return value
    raise ConfigError(source, key, "unsupported value")  # pragma: no cover


def _in_bounds(source: str, key: str, value: float) -> float:
    low, high = BOUNDS[key]
    # Compared before any conversion: a 400-digit integer cannot become a float,
    # and NaN compares false with everything, so it fails this test too.
    if (isinstance(value, float) and math.isnan(value)) or not low <= value <= high:
        raise ConfigError(
            source, key, f"must be between {_number(low)} and {_number(high)}, not {_show(value)}"
        )
    return value


def _number(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


def _show(value: Any) -> str:
    """A refused value as the error repeats it: short, whatever the file held."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


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


def _check_path(src: str, key: str, path: str, limit: int = _PATH_MAX) -> None:
    if not path.startswith("/"):
        raise ConfigError(src, key, "must be an absolute path")
    if "\0" in path or len(path.encode("utf-8", "surrogateescape")) > limit:
        raise ConfigError(src, key, f"must be at most {limit} bytes, without NUL")


def _check_daemon(src: str, d: DaemonConfig) -> None:
    _check_path(src, "daemon.socket", d.socket, _SUN_PATH_MAX)
    _check_path(src, "daemon.state_dir", d.state_dir)
    if d.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(src, "daemon.log_level", "must be one of debug, info, warning, error")
    if d.admin_group:
        # getgrnam() raises ValueError on a NUL; no group database holds such names.
        if not d.admin_group.isprintable() or len(d.admin_group) > 256 or ":" in d.admin_group:
            raise ConfigError(src, "daemon.admin_group", "not a group name")
        try:
            grp.getgrnam(d.admin_group)
        except KeyError:
            raise ConfigError(
                src, "daemon.admin_group", f"no group named {d.admin_group!r}"
            ) from None
    _check_daemon_limits(src, d)


def _check_daemon_limits(src: str, d: DaemonConfig) -> None:
    for key in (
        "max_connections",
        "max_connections_per_uid",
        "max_connections_per_non_tenant",
        "max_non_tenant_connections",
        "max_streams_per_uid",
        "audit_refusal_burst",
    ):
        if getattr(d, key) < 1:
            raise ConfigError(src, f"daemon.{key}", "must be at least 1")
    if not 0 <= d.reserved_connections < d.max_connections:
        raise ConfigError(
            src, "daemon.reserved_connections", "must be at least 0 and below max_connections"
        )
    for key in ("idle_timeout", "call_timeout", "message_timeout", "audit_refusal_rate"):
        if not getattr(d, key) > 0:
            raise ConfigError(src, f"daemon.{key}", "must be positive")
    if not d.max_message_bytes <= d.max_queued_output_bytes_per_uid <= d.max_queued_output_bytes:
        raise ConfigError(
            src,
            "daemon.max_queued_output_bytes_per_uid",
            "must be between max_message_bytes and max_queued_output_bytes",
        )
    if not 1024 <= d.max_message_bytes <= 16 * 1024 * 1024:
        raise ConfigError(src, "daemon.max_message_bytes", "must be between 1024 and 16777216")


def parse_listen(value: str) -> tuple[str, int] | None:
    """``host:port``, ``[v6]:port`` or ``:port`` (all addresses); "" disables (None).

    Raises ValueError with a reason for anything else.
    """
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError('an IPv6 address needs brackets and a port, e.g. "[::1]:9917"')
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError('expected host:port, e.g. "127.0.0.1:9917"')
        if ":" in host:
            raise ValueError('put IPv6 addresses in brackets, e.g. "[::1]:9917"')
    # ASCII digits only (str.isdigit() accepts every script's); 0: any free port (tests)
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) < 65536):
        raise ValueError(f"invalid port {port!r}")
    if any(c.isspace() or not c.isprintable() or c in "/[]" for c in host):
        raise ValueError(f"invalid host {host!r}")
    return host, int(port)


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


def _check_systemd(src: str, s: SystemdConfig) -> None:
    parent = s.parent_slice
    if (
        not re.fullmatch(r"[A-Za-z0-9_.\\:]+(-[A-Za-z0-9_.\\:]+)*\.slice", parent)
        or parent == "-.slice"
    ):
        raise ConfigError(
            src, "systemd.parent_slice", "must be a slice unit name such as tenant.slice"
        )
    # The tenant slices are "<stem>-<uid>.slice"; a unit name has at most 255 bytes.
    if len(parent) + len(f"-{MAX_UID}") > 255:
        raise ConfigError(src, "systemd.parent_slice", "too long for tenant slice names")
    if s.enter_scope not in ("auto", "always", "never"):
        raise ConfigError(src, "systemd.enter_scope", 'must be "auto", "always" or "never"')
    if s.use_pidfds not in ("auto", "never"):
        raise ConfigError(src, "systemd.use_pidfds", 'must be "auto" or "never"')


def _check_tenants(src: str, t: TenantsConfig) -> None:
    if not 0 < t.uid_min <= t.uid_max < 2**32 - 1:
        raise ConfigError(
            src, "tenants.uid_max",
            "need 0 < uid_min <= uid_max < 4294967295 (root is never a tenant)",
        )  # fmt: skip


def _check_netns(src: str, n: NetnsConfig) -> None:
    _check_path(src, "netns.run_dir", n.run_dir)
    if n.run_dir.rstrip("/") in ("", "/proc", "/sys"):
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
    """The template must give a valid file name for every valid user name and UID."""
    key = "netns.name_template"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:  # "{user}}", "{user": str.format's own syntax errors
        reason = f"not a valid template: {e} (write {{{{ or }}}} for a literal brace)"
        raise ConfigError(src, key, reason) from None
    literal = "".join(text for text, _, _, _ in parts)
    used = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    for name, spec, conv in used:
        if name not in _TEMPLATE_FIELDS:
            raise ConfigError(src, key, f"unknown field {{{name}}} (known: {{user}}, {{uid}})")
        if spec or conv:
            # "{uid:>300}" or "{user!r}" would change lengths and characters.
            raise ConfigError(src, key, f"{{{name}}} takes no format spec or conversion")
    # Injective: user names and UIDs are each unique, so the name must change
    # when either does ("{{user}}" is a literal and would not).
    if not used:
        raise ConfigError(src, key, "must contain {user} or {uid}, or names would collide")
    if "/" in literal:
        raise ConfigError(src, key, "must give a plain file name (no '/')")
    if not literal.isprintable():
        raise ConfigError(src, key, "must not contain control characters")
    longest = len(literal.encode()) + sum(_TEMPLATE_FIELDS[name] for name, _, _ in used)
    if longest > _NAME_MAX:
        raise ConfigError(
            src, key,
            f"gives names of up to {longest} bytes for a 32-character user name; "
            f"a file name holds at most {_NAME_MAX}",
        )  # fmt: skip


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
    _check_ipv6(src, i)
    _check_lease_times(src, i)
    if i.strategy == "uid":
        _check_uid_strategy(src, cfg, net4)


def _check_ipv6(src: str, i: IpamConfig) -> None:
    if i.ipv6_prefix:
        try:
            net6 = ipaddress.IPv6Network(i.ipv6_prefix)
        except ValueError as e:
            raise ConfigError(src, "ipam.ipv6_prefix", f"not an IPv6 network: {e}") from e
        if net6.network_address.scope_id is not None:
            raise ConfigError(src, "ipam.ipv6_prefix", "must not name a zone (%...)")
        if net6.prefixlen > 56:
            raise ConfigError(
                src, "ipam.ipv6_prefix", "must be /56 or shorter (one /64 per tenant)"
            )
    try:
        gw6 = ipaddress.IPv6Address(i.ipv6_gateway)
    except ValueError as e:
        raise ConfigError(src, "ipam.ipv6_gateway", f"not an IPv6 address: {e}") from e
    # ipaddress accepts a zone ("fe80::1%eth0"); netlink and nft take none.
    if gw6.scope_id is not None:
        raise ConfigError(src, "ipam.ipv6_gateway", "must not name a zone (%...)")
    if not gw6.is_link_local:
        raise ConfigError(src, "ipam.ipv6_gateway", "must be link-local (fe80::/10)")


def _check_lease_times(src: str, i: IpamConfig) -> None:
    if i.quarantine_seconds < 0:
        raise ConfigError(src, "ipam.quarantine_seconds", "must not be negative")
    if not 1.0 <= i.purge_interval <= 86400.0:
        raise ConfigError(src, "ipam.purge_interval", "must be between 1 and 86400 seconds")


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
