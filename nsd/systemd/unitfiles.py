"""Tenant drop-ins for opted-in unit templates: ``Slice=`` for ``php-fpm@alice.service``.

The problem
-----------
A template such as ``php-fpm@.service`` is instantiated by *user name*
(``php-fpm@web-shop.service``). ``User=%i`` and ``NetworkNamespacePath=/run/netns/%i``
can be written in the template itself, but the tenant's slice cannot: it is named from
the UID (``tenant-1001.slice``; a dash in a slice name means nesting, so never the user
name), no specifier maps a user name to its UID, and slices cannot have aliases.

So nsd writes, for every tenant and every opted-in template, a drop-in
``/etc/systemd/system/<prefix>@<user>.service.d/50-nsd-tenant.conf`` with ``Slice=``,
and asks systemd to reload once per batch. Being files in /etc, they exist at boot
before nsd runs, like the slices' own limits (see :mod:`nsd.systemd.units`).

A template opts in with ``X-NSD-Tenant=yes`` in its ``[Unit]`` section, in the file or
in one of its drop-ins (``<template>.d/*.conf``). systemd ignores keys starting with
``X-`` without a warning (checked with systemd 252, also by ``systemd-analyze verify``);
nsd/unit_templates.py finds the templates that opted in.

The instance is the user name, verbatim
---------------------------------------
``systemctl start php-fpm@web-shop.service`` gives ``%i`` = ``web-shop`` and ``%I`` =
``web/shop`` (unescaping turns ``-`` into ``/``), so templates use ``%i``. The instance
must therefore *not* be escaped with :func:`systemd_escape`: that would give
``php-fpm@web\\x2dshop.service``, a different unit whose ``%i`` is ``web\\x2dshop``. Every
user name nsd accepts is a valid instance as it is, except one ending in ``$`` (Samba
machine accounts), which systemd would have to escape; such users get no drop-ins
(:func:`instance_name` says why).

Ownership
---------
A drop-in is nsd's when its file name is ``50-nsd-tenant.conf`` *and* its first line is
:data:`HEADER`. Nothing else is ever changed or removed; a same-named file without the
header is reported as a conflict and left alone. A ``.d`` directory is removed only when
it is empty after nsd removed its own file from it.

This module is pure file work (no D-Bus, no daemon state) and synchronous: the daemon
runs it off its event loop, then calls systemd's ``Reload`` when :attr:`Changes.changed`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nsd.names import check_user_name, slice_name
from nsd.systemd.unit_templates import SEARCH_PATH, TEMPLATE_NAME, Template, find_templates, listdir

DROPIN_ROOT: Final = "/etc/systemd/system"
DROPIN_NAME: Final = "50-nsd-tenant.conf"
HEADER: Final = "# nsd tenant drop-in: nsd writes and removes this file; edits are overwritten."
DEFAULT_PARENT_SLICE: Final = "tenant.slice"

# systemd's src/basic/unit-name.c: characters valid in a unit name (besides "@").
_VALID_CHARS: Final = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:-_.\\"
)
_UNIT_NAME_MAX: Final = 255  # UNIT_NAME_MAX is 256 including the NUL
_TEMP_FILE: Final = re.compile(re.escape("." + DROPIN_NAME) + r"\.[0-9a-f]{16}\.tmp")


# -- names ----------------------------------------------------------------------


def systemd_escape(text: str) -> str:
    """``systemd-escape TEXT``: systemd's unit-name escaping of a string (not ``--path``).

    ``/`` becomes ``-``; ``-``, ``\\``, a leading ``.`` and every byte outside
    ``[A-Za-z0-9:_.]`` become ``\\xNN`` (lower-case hex, per UTF-8 byte).
    """
    out: list[str] = []
    raw = text.encode("utf-8", "surrogateescape")
    for i, byte in enumerate(raw):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif (i == 0 and char == ".") or char in "-\\" or char not in _VALID_CHARS:
            out.append(f"\\x{byte:02x}")
        else:
            out.append(char)
    return "".join(out)


def systemd_unescape(text: str) -> str:
    """``systemd-escape --unescape TEXT``: what ``%I`` makes of an instance ``%i``.

    ``-`` becomes ``/`` and ``\\xNN`` the byte NN; any other ``\\`` is an error
    (ValueError), as in systemd.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "-":
            out += b"/"
            i += 1
        elif char == "\\":
            digits = text[i + 2 : i + 4]
            if text[i + 1 : i + 2] != "x" or not re.fullmatch(r"[0-9a-fA-F]{2}", digits):
                raise ValueError(f"invalid escape in {text!r} at offset {i}")
            out.append(int(digits, 16))
            i += 4
        else:
            out += char.encode("utf-8", "surrogateescape")
            i += 1
    return out.decode("utf-8", "surrogateescape")


def instance_name(user: str) -> str:
    """The instance string of ``user``'s units: the user name itself, so that ``%i`` is it.

    ValueError if ``user`` is not a user name nsd accepts, or needs escaping to be an
    instance (``alice$`` would become ``alice\\x24``, and ``%i`` would no longer be the
    user name; ``%I`` would, but turns the dashes of ``web-shop`` into slashes).
    """
    reason = check_user_name(user)
    if reason is not None:
        raise ValueError(f"invalid user name {user!r}: {reason}")
    bad = sorted({c for c in user if c not in _VALID_CHARS or c == "\\"})
    if bad:
        raise ValueError(
            f"user {user!r} cannot be a unit instance as it is: systemd would escape it to "
            f"{systemd_escape(user)!r}, and %i would no longer be the user name"
        )
    return user


def unit_name(template: str, user: str) -> str:
    """``php-fpm@.service`` and ``web-shop`` -> ``php-fpm@web-shop.service``."""
    prefix = _template_prefix(template)
    name = f"{prefix}@{instance_name(user)}.service"
    if len(name) > _UNIT_NAME_MAX:
        raise ValueError(f"unit name {name!r} is longer than {_UNIT_NAME_MAX} characters")
    return name


def _template_prefix(template: str) -> str:
    match = TEMPLATE_NAME.fullmatch(template)
    if match is None:
        raise ValueError(f"{template!r} is not a service template (PREFIX@.service)")
    return match.group(1)


# -- what the drop-ins should be ------------------------------------------------------


@dataclass(frozen=True)
class TenantRef:
    """What a drop-in needs to know about a tenant."""

    user: str
    uid: int
    slice: str  #: ``tenant-1001.slice``

    @classmethod
    def of(cls, user: str, uid: int, parent: str = DEFAULT_PARENT_SLICE) -> TenantRef:
        return cls(user, uid, slice_name(parent, uid))


@dataclass(frozen=True)
class Skipped:
    user: str
    reason: str


def render_dropin(template: str, user: str, uid: int, slice: str) -> str:
    """The drop-in text that puts ``user``'s instance of ``template`` into ``slice``."""
    _template_prefix(template)
    if check_user_name(user) is not None:
        raise ValueError(f"invalid user name {user!r}")
    if not re.fullmatch(r"[0-9A-Za-z:_.\\-]+\.slice", slice):
        raise ValueError(f"{slice!r} is not a slice name")
    return (
        f"{HEADER}\n"
        f"# Tenant {user} (uid {uid}), template {template}. nsd removes this file when the\n"
        "# tenant is removed or the template no longer carries X-NSD-Tenant=yes.\n"
        "[Service]\n"
        "# The tenant's slice is named from its UID (a dash in a slice name nests it), and\n"
        "# no specifier maps a user name to a UID: hence this file rather than the template.\n"
        f"Slice={slice}\n"
    )


def desired_dropins(
    templates: Iterable[str | Template], tenants: Iterable[TenantRef]
) -> tuple[dict[str, str], list[Skipped]]:
    """Unit name -> drop-in text for every (template, tenant); and the tenants skipped."""
    names = sorted({t.name if isinstance(t, Template) else t for t in templates})
    out: dict[str, str] = {}
    skipped: list[Skipped] = []
    for tenant in tenants:
        try:
            for template in names:
                out[unit_name(template, tenant.user)] = render_dropin(
                    template, tenant.user, tenant.uid, tenant.slice
                )
        except ValueError as e:
            skipped.append(Skipped(tenant.user, str(e)))
    return out, skipped


# -- applying them ----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    unit: str
    reason: str


@dataclass(frozen=True)
class Changes:
    """What :func:`apply` did; unit names, sorted."""

    written: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ()  #: conflicts and errors; nothing was changed for them
    skipped: tuple[Skipped, ...] = ()  #: tenants whose user name cannot be an instance

    @property
    def changed(self) -> bool:
        """True when systemd must reload to see the new state."""
        return bool(self.written or self.removed)


def existing_dropins(root: str | os.PathLike[str] = DROPIN_ROOT) -> dict[str, str]:
    """Unit name -> text of every drop-in under ``root`` that is nsd's (name and header)."""
    out: dict[str, str] = {}
    base = Path(root)
    for entry in listdir(base):
        unit = _instance_unit(entry)
        if unit is None or not _is_real_dir(base / entry):
            continue
        text = _read_ours(base / entry / DROPIN_NAME)
        if text is not None:
            out[unit] = text
    return out


def apply(
    desired: Mapping[str, str],
    root: str | os.PathLike[str] = DROPIN_ROOT,
    *,
    prune_users: Collection[str] | None = None,
) -> Changes:
    """Make nsd's drop-ins under ``root`` exactly ``desired`` (unit name -> text).

    Writes are atomic (temporary file in the ``.d`` directory, fsync, rename, fsync of
    the directory); a file whose text is already right is not touched. nsd's drop-ins
    not in ``desired`` are removed, and then their ``.d`` directory if it is empty -
    all of them, or with ``prune_users`` only those of these users' instances (to add
    or remove one tenant without knowing the others). A unit whose ``.d`` is not a
    plain directory, or whose ``50-nsd-tenant.conf`` is not nsd's, is left alone and
    reported in :attr:`Changes.problems`; so are errors, unit by unit.
    """
    base = Path(root)
    written: list[str] = []
    removed: list[str] = []
    problems: list[Problem] = []
    for unit in sorted(desired):
        if _instance_unit(unit + ".d") is None:
            problems.append(Problem(unit, "not a template instance of a service"))
            continue
        try:
            if _write(base / f"{unit}.d", desired[unit], unit, problems):
                written.append(unit)
        except OSError as e:
            problems.append(Problem(unit, f"cannot write: {e}"))
    for unit in sorted(existing_dropins(base)):
        if unit in desired:
            continue
        if prune_users is not None and _instance_of(unit) not in prune_users:
            continue
        try:
            _remove(base / f"{unit}.d")
            removed.append(unit)
        except OSError as e:
            problems.append(Problem(unit, f"cannot remove: {e}"))
    _clean_temp_files(base)
    return Changes(tuple(written), tuple(removed), tuple(problems))


def sync(
    tenants: Iterable[TenantRef],
    *,
    search_path: Sequence[str | os.PathLike[str]] = SEARCH_PATH,
    root: str | os.PathLike[str] = DROPIN_ROOT,
    prune_users: Collection[str] | None = None,
) -> Changes:
    """Find the opted-in templates, derive the drop-ins for ``tenants`` and apply them.

    With all tenants and no ``prune_users``: the reconcile at start (stale drop-ins of
    removed tenants and unmarked templates go). For one tenant: ``sync([t],
    prune_users={t.user})`` after creating it, ``sync([], prune_users={user})`` after
    removing it. Reload systemd when the result's ``changed`` is true.
    """
    tenants = list(tenants)
    desired, skipped = desired_dropins(find_templates(search_path), tenants)
    changes = apply(desired, root, prune_users=prune_users)
    return Changes(changes.written, changes.removed, changes.problems, tuple(skipped))


def _instance_unit(dirname: str) -> str | None:
    """``php-fpm@alice.service.d`` -> ``php-fpm@alice.service``; None for anything else."""
    match = re.fullmatch(r"([0-9A-Za-z:_.\\-]+)@([^/]+)\.service\.d", dirname)
    return dirname[: -len(".d")] if match else None


def _instance_of(unit: str) -> str:
    return unit.split("@", 1)[1][: -len(".service")]


def _is_real_dir(path: Path) -> bool:
    try:
        return not path.is_symlink() and path.is_dir()
    except OSError:
        return False


def _read_ours(path: Path) -> str | None:
    """The text of ``path`` if it is a regular file starting with HEADER (no links)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not _is_regular(info.st_mode) or info.st_size > 65536:
            return None
        data = os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace")
    return text if text.split("\n", 1)[0] == HEADER else None


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _write(directory: Path, text: str, unit: str, problems: list[Problem]) -> bool:
    """Write ``text`` as nsd's drop-in in ``directory``; False if unchanged or refused."""
    if os.path.lexists(directory) and not _is_real_dir(directory):
        problems.append(Problem(unit, f"{directory} is not a directory (or is a link)"))
        return False
    target = directory / DROPIN_NAME
    if os.path.lexists(target):
        current = _read_ours(target)
        if current is None:
            problems.append(Problem(unit, f"{target} exists and is not nsd's; left alone"))
            return False
        if current == text:
            return False
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o755)
    # Everything below through a descriptor of the directory opened without following a
    # link: what is written and renamed is exactly in the directory that was checked.
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        temp = f".{DROPIN_NAME}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, 0o644, dir_fd=dfd)
        try:
            try:
                os.fchmod(fd, 0o644)  # whatever the umask
                os.write(fd, text.encode("utf-8"))
                os.fsync(fd)  # the data is on disk before the name points to it
            finally:
                os.close(fd)
            os.rename(temp, DROPIN_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dfd)
            raise
        os.fsync(dfd)  # and the rename too
    finally:
        os.close(dfd)
    return True


def _remove(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.unlink(DROPIN_NAME, dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    try:
        os.rmdir(directory)  # only succeeds when nothing else is in it
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise


def _clean_temp_files(base: Path) -> None:
    """Temporary files left by a crash between create and rename (name and header checked)."""
    for entry in listdir(base):
        if _instance_unit(entry) is None or not _is_real_dir(base / entry):
            continue
        for name in listdir(base / entry):
            if not _TEMP_FILE.fullmatch(name):
                continue
            path = base / entry / name
            with contextlib.suppress(OSError):
                info = path.lstat()
                if _is_regular(info.st_mode) and (
                    info.st_size == 0 or _read_ours(path) is not None
                ):
                    os.unlink(path)
