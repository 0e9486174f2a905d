"""What a configuration must satisfy: the error, the numeric bounds, the cross-field checks.

nsd.config reads a file into typed sections; this module holds what every value
is checked against. Numbers are checked against BOUNDS as they are read
(``in_bounds``), so nothing can overflow or be NaN later; ``validate`` then
checks each section whole and the fields that depend on each other.
``parse_listen`` is here because metrics.listen is checked with it; the metrics
exporter parses the same value with it when it starts.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import re
import string
from typing import TYPE_CHECKING, Any

from nsd.names import MAX_UID, valid_ifname

if TYPE_CHECKING:
    # Annotations only: nsd.config builds these sections and calls validate().
    from nsd.config import (
        Config,
        DaemonConfig,
        FaultsConfig,
        IpamConfig,
        MetricsConfig,
        NetnsConfig,
        SystemdConfig,
        TenantsConfig,
    )

_LINK_PREFIX = re.compile(r"[a-z]([a-z0-9]{0,3}[a-z])?")
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


def in_bounds(source: str, key: str, value: float) -> float:
    low, high = BOUNDS[key]
    # Compared before any conversion: a 400-digit integer cannot become a float,
    # and NaN compares false with everything, so it fails this test too.
    if (isinstance(value, float) and math.isnan(value)) or not low <= value <= high:
        raise ConfigError(
            source, key, f"must be between {_number(low)} and {_number(high)}, not {show(value)}"
        )
    return value


def _number(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


def show(value: Any) -> str:
    """A refused value as the error repeats it: short, whatever the file held."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


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
