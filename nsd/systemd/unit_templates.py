"""Finding the unit templates that opted in to tenant drop-ins (nsd/unitfiles.py).

A template opts in with ``X-NSD-Tenant=yes`` in its ``[Unit]`` section, in the file or in
one of its drop-ins (``<template>.d/*.conf``). systemd ignores keys starting with ``X-``
without a warning (checked with systemd 252, also by ``systemd-analyze verify``). This
module reads the unit search path as systemd does and lints what it finds; it writes
nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SEARCH_PATH: Final[tuple[str, ...]] = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)
"""The system manager's unit search path, highest priority first (systemd.unit(5))."""

MARKER: Final = "X-NSD-Tenant"
#: a service template's file name; group 1 is its prefix (``php-fpm`` of ``php-fpm@.service``)
TEMPLATE_NAME: Final = re.compile(r"([0-9A-Za-z:_.\\-]+)@\.service")
_TRUE: Final = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE: Final = frozenset({"0", "no", "n", "false", "f", "off"})


def listdir(directory: Path) -> list[str]:
    """The sorted entries of ``directory``; none if it cannot be read."""
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


@dataclass(frozen=True)
class Template:
    """An opted-in template: its name, the file systemd loads for it, the marker's file."""

    name: str  #: ``php-fpm@.service``
    path: Path  #: the template file (after following a link), as systemd finds it
    marked_in: Path  #: the file whose ``X-NSD-Tenant=`` decided (the template or a drop-in)
    warnings: tuple[str, ...] = ()  #: doubtful settings, for the log (see :func:`lint`)


def find_templates(search_path: Sequence[str | os.PathLike[str]] = SEARCH_PATH) -> list[Template]:
    """The ``*@.service`` templates in ``search_path`` that carry ``X-NSD-Tenant=yes``.

    As systemd does: the first directory with a file of a name wins, so a file in /etc
    masks the same name in /usr; a link to /dev/null or an empty file masks the unit
    (not opted in); drop-ins ``<name>.d/*.conf`` are read from every directory, a file
    name in an earlier directory masking the same name in a later one, in file-name
    order, the last ``X-NSD-Tenant=`` winning. A link to a file of another name is an
    alias, which systemd loads under the target's name: it is skipped here (opt in the
    target). Unreadable files count as not opted in.
    """
    dirs = [Path(d) for d in search_path]
    fragments: dict[str, Path | None] = {}  # name -> fragment; None: masked or alias
    for directory in dirs:
        for entry in listdir(directory):
            if entry in fragments or TEMPLATE_NAME.fullmatch(entry) is None:
                continue
            fragments[entry] = _fragment(directory / entry)
    found: list[Template] = []
    for name in sorted(fragments):
        fragment = fragments[name]
        if fragment is None:
            continue
        marked: tuple[bool, Path] | None = None
        text = _read_text(fragment)
        if text is None:
            continue
        value = _marker_value(text)
        if value is not None:
            marked = (value, fragment)
        for dropin in _dropins(dirs, name):
            dropin_text = _read_text(dropin)
            value = _marker_value(dropin_text) if dropin_text is not None else None
            if value is not None:
                marked = (value, dropin)
        if marked is not None and marked[0]:
            found.append(Template(name, fragment, marked[1], tuple(lint(text))))
    return found


def _fragment(path: Path) -> Path | None:
    """The file systemd loads for this entry; None when it masks the unit or is an alias."""
    try:
        if path.is_symlink():
            target = path.resolve(strict=True)
            if str(target) == os.devnull or target.name != path.name:
                return None
            path = target
        info = path.stat()
    except (OSError, RuntimeError):
        return None
    if not path.is_file() or info.st_size == 0:
        return None
    return path


def _dropins(dirs: Sequence[Path], name: str) -> list[Path]:
    chosen: dict[str, Path] = {}
    for directory in dirs:
        for entry in listdir(directory / f"{name}.d"):
            if entry.endswith(".conf") and entry not in chosen:
                chosen[entry] = directory / f"{name}.d" / entry
    return [chosen[k] for k in sorted(chosen)]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _assignments(text: str) -> Iterable[tuple[str, str, str]]:
    """(section, key, value) of a unit file, with systemd's comment and continuation rules."""
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line[:1] in ("#", ";"):
            continue  # comment lines inside a continuation are skipped
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line:
            key, value = line.split("=", 1)
            yield section, key.strip(), value.strip()


def _marker_value(text: str) -> bool | None:
    value: bool | None = None
    for section, key, raw in _assignments(text):
        if section == "Unit" and key == MARKER:
            low = raw.lower()
            value = True if low in _TRUE else False if low in _FALSE else None
    return value


def lint(text: str) -> list[str]:
    """Doubts about an opted-in template's text, for the log; empty when it looks right."""
    out: list[str] = []
    for section, key, value in _assignments(text):
        if section not in ("Unit", "Service") or key == "Description":
            continue
        if "%I" in value.replace("%%", ""):
            out.append(
                f"{key}= uses %I, which turns the dashes of a user name into slashes "
                "(web-shop -> web/shop); use %i"
            )
        if key == "Slice":
            out.append("Slice= in the template is overridden by nsd's drop-in; remove it")
    return out
