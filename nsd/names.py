"""The one place that derives host-visible names from a tenant.

Every name the host sees is derived from the numeric UID, never from the user
name: user names may contain dashes (which nest systemd slices), may be renamed,
and are too long for interface names. The namespace file is the one exception,
because operators read ``ip netns list``; its template must contain ``{user}``
or ``{uid}`` so names stay injective (checked in config).
"""

from __future__ import annotations

import re

# Debian's adduser default NAME_REGEX is ^[a-z][-a-z0-9_]*$; useradd accepts more.
# We accept the portable POSIX set plus the trailing "$" of Samba machine
# accounts, and refuse anything that could be a path component trick.
_USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
MAX_IFNAME = 15  # IFNAMSIZ - 1
MAX_UID = 2**32 - 2  # (uid_t)-1 is the "no change" sentinel, never a user

# The kernel's rules for interface names (net/core/dev.c dev_valid_name).
_BAD_IFNAME_CHARS = re.compile(r"[/:%\s\x00]")
# Per-namespace sysctls: net.* keys only (other keys are host-global, and writing
# them "inside" a namespace would change the whole host); values one short line.
SYSCTL_KEY = re.compile(r"net(\.[A-Za-z0-9_-]+)+")
SYSCTL_VALUE = re.compile(r"[\x20-\x7e\t]{0,256}")


def valid_ifname(name: str) -> bool:
    raw = name.encode("utf-8", "surrogateescape")
    return (
        0 < len(raw) <= MAX_IFNAME
        and name not in (".", "..")
        and not _BAD_IFNAME_CHARS.search(name)
    )


def check_user_name(name: str) -> str | None:
    """Return why ``name`` is not an acceptable user name, or None if it is."""
    if not name:
        return "empty"
    if len(name) > 32:
        return "longer than 32 characters"
    if name in (".", ".."):
        return "reserved"
    if not _USER_NAME.fullmatch(name):
        return "must match [a-z_][a-z0-9_.-]* (optionally ending in $), at most 32 characters"
    return None


def host_ifname(prefix: str, uid: int) -> str:
    """Host-side veth name: prefix + decimal UID, e.g. ``nsd1001``.

    Decimal without leading zeros is injective and lets a reader see the UID;
    the prefix (at most 5 characters, checked in config) plus 10 digits fits 15
    bytes.
    """
    _check_uid(uid)
    name = f"{prefix}{uid}"
    if len(name.encode()) > MAX_IFNAME:  # config keeps the prefix short enough
        raise ValueError(f"interface name {name!r} is longer than {MAX_IFNAME} bytes")
    return name


def uid_from_ifname(prefix: str, name: str) -> int | None:
    """Inverse of :func:`host_ifname`; None for any name nsd did not derive."""
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix) :]
    if not digits.isascii() or not digits.isdigit():
        return None
    if digits != "0" and digits.startswith("0"):
        return None  # "nsd01" is not ours: host_ifname never writes leading zeros
    uid = int(digits)
    return uid if uid <= MAX_UID else None


def netns_name(template: str, user: str, uid: int) -> str:
    """The namespace file name under the run dir, from the configured template."""
    _check_uid(uid)
    reason = check_user_name(user)
    if reason is not None:
        raise ValueError(f"invalid user name {user!r}: {reason}")
    name = template.format(user=user, uid=uid)
    if "/" in name or name in (".", "..") or "\0" in name or len(name) > 255:
        raise ValueError(f"template gives an invalid file name {name!r}")
    return name


def slice_name(parent: str, uid: int) -> str:
    """Tenant slice: ``tenant-1001.slice`` inside ``tenant.slice``.

    systemd nests slices by dashes, so the child's name is the parent's stem plus
    one dash-free component; the UID has no dashes, a user name might.
    """
    _check_uid(uid)
    if not parent.endswith(".slice"):
        raise ValueError(f"{parent!r} is not a slice")
    stem = parent[: -len(".slice")]
    return f"{uid}.slice" if stem == "-" else f"{stem}-{uid}.slice"


def _check_uid(uid: int) -> None:
    if isinstance(uid, bool) or not 0 <= uid <= MAX_UID:
        raise ValueError(f"uid {uid!r} out of range")


# Process names (``comm``), as /proc/PID/status shows them.
COMM_LEN = 15  # TASK_COMM_LEN - 1: /proc/PID/status "Name:" is truncated to this
#: launch and babysitting helpers counted per tenant (metrics.helpers' default)
DEFAULT_HELPERS: tuple[str, ...] = ("(sd-pam)", "su", "sudo", "runuser", "nsenter")
