"""Unit properties as systemd's D-Bus API takes them: resource limits, a service's
command line, unit object paths, and the marshalling of property lists (file
descriptors included) into a message."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from dbus_fast import Variant

from nsd.systemd.dbus_types import MANAGER_PATH, UINT64_MAX, Fd, Property


def _weight(name: str, value: int) -> Property:
    if value != UINT64_MAX and not 1 <= value <= 10000:
        raise ValueError(f"{name} must be 1..10000 (or UINT64_MAX for the default), not {value}")
    return (name, "t", value)


def _bytes(name: str, value: int) -> Property:
    if not 0 <= value <= UINT64_MAX:
        raise ValueError(f"{name} must be 0..2^64-1 bytes (UINT64_MAX = infinity), not {value}")
    return (name, "t", value)


def limit_properties(
    *,
    memory_min: int | None = None,
    memory_low: int | None = None,
    memory_high: int | None = None,
    memory_max: int | None = None,
    memory_swap_max: int | None = None,
    cpu_weight: int | None = None,
    cpu_quota_percent: float | None = None,
    tasks_max: int | None = None,
    io_weight: int | None = None,
) -> list[Property]:
    """Resource-control properties in systemd's D-Bus names and signatures.

    ``None`` leaves a setting out (unchanged). Memory values and ``tasks_max`` are
    absolute numbers; :data:`INFINITY` (UINT64_MAX) means no limit. Weights are
    1..10000, or UINT64_MAX to return to systemd's default. ``cpu_quota_percent`` is the
    share of one CPU (200 = two CPUs), sent as ``CPUQuotaPerSecUSec``;
    ``float('inf')`` removes the quota.
    """
    props: list[Property] = []
    for name, value in (
        ("MemoryMin", memory_min),
        ("MemoryLow", memory_low),
        ("MemoryHigh", memory_high),
        ("MemoryMax", memory_max),
        ("MemorySwapMax", memory_swap_max),
        ("TasksMax", tasks_max),
    ):
        if value is not None:
            props.append(_bytes(name, value))
    if cpu_weight is not None:
        props.append(_weight("CPUWeight", cpu_weight))
    if io_weight is not None:
        props.append(_weight("IOWeight", io_weight))
    if cpu_quota_percent is not None:
        if cpu_quota_percent == float("inf"):
            props.append(("CPUQuotaPerSecUSec", "t", UINT64_MAX))
        elif cpu_quota_percent > 0:
            # 1 % of a CPU is 10 ms of CPU time per second; systemd rounds to 1 ms itself.
            props.append(("CPUQuotaPerSecUSec", "t", round(cpu_quota_percent * 10_000)))
        else:
            raise ValueError(f"CPU quota must be > 0 percent, not {cpu_quota_percent}")
    return props


def exec_start(
    argv: Sequence[str], *, expand_environment: bool = False, ignore_failure: bool = False
) -> Property:
    """The command of a transient service, run with exactly this ``argv``.

    systemd expands ``$VAR``/``${VAR}`` in a unit's command line and turns ``$$`` into
    ``$`` - also for ``ExecStart`` set over D-Bus - so a tenant's ``sh -c 'echo $$'``
    would arrive mangled. ``ExecStartEx`` with the ``no-env-expand`` flag (systemd 247+,
    the ``:`` prefix of unit files) passes argv through untouched. argv[0] must be an
    absolute path.
    """
    if not argv or not argv[0].startswith("/"):
        raise ValueError("the command needs an absolute path as argv[0]")
    flags = [] if expand_environment else ["no-env-expand"]
    if ignore_failure:
        flags.append("ignore-failure")
    return ("ExecStartEx", "a(sasas)", [[argv[0], list(argv), flags]])


def unit_object_path(name: str) -> str:
    """The D-Bus object path systemd gives a unit (sd-bus label escaping)."""
    if not name:
        return MANAGER_PATH + "/unit/_"
    escaped = "".join(
        ch if (ch.isascii() and ch.isalnum()) else "".join(f"_{b:02x}" for b in ch.encode())
        for ch in name
    )
    return f"{MANAGER_PATH}/unit/{escaped}"


def unit_name_from_path(path: str) -> str:
    """Inverse of :func:`unit_object_path`."""
    label = path.rsplit("/", 1)[-1]
    if label == "_":
        return ""
    return re.sub(rb"_([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), label.encode()).decode()


def marshal_value(signature: str, value: Any, fds: list[int]) -> Any:
    if signature == "h":
        if not isinstance(value, Fd):
            raise TypeError("a 'h' property value must be an Fd")
        fds.append(value.fd)
        return len(fds) - 1
    if signature == "ah":
        out = []
        for item in value:
            if not isinstance(item, Fd):
                raise TypeError("an 'ah' property value must be a list of Fd")
            fds.append(item.fd)
            out.append(len(fds) - 1)
        return out
    return value


def marshal_properties(properties: Iterable[Property], fds: list[int]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for name, sig, value in properties:
        try:
            out.append([name, Variant(sig, marshal_value(sig, value, fds))])
        except Exception as e:  # dbus-fast checks the value against the signature
            raise ValueError(f"property {name} ({sig!r}): {e}") from e
    return out


def unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value
