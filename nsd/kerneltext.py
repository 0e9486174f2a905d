"""How nsd reads text the kernel prints in /proc and cgroupfs.

Some fields of those files are chosen by a tenant, and hold any byte the kernel
allows: a process name (comm: any byte but NUL, 15 at most), a cgroup's name in a
delegated subtree (any byte but NUL, "/" and "\\n"; "\\r" and bytes that are not
UTF-8 included), a mount point (a FUSE mount by a user). So every parser here
follows three rules:

* **Lines end at "\\n" only.** ``bytes.splitlines()`` also splits at "\\r", "\\v",
  "\\f" and "\\x1c"-"\\x1e" (``str.splitlines()`` at more), so a cgroup named
  ``x\\r0::/tenant.slice/tenant-1001.slice`` would forge a line of its own. The
  kernel never prints a raw "\\n" inside these fields: mkdir of a cgroup refuses
  it, ``status`` and ``mountinfo`` escape it. (``/proc/PID/stat`` does not escape
  comm; its parser finds the fields after the last ")".)
* **Fields are found by position, paths are opaque bytes.** A line is taken
  apart at the separators the format defines (the first two ":" of a cgroup line;
  the rest is the path, whatever it holds), and paths are compared as bytes, never
  shortened in a loop that assumes they hold a "/".
* **One decode policy** (:func:`decode`), applied once, where a name or path leaves
  the parser for display (API replies, logs, metric labels): UTF-8, with each byte
  that is not part of valid UTF-8 written as ``\\xNN``. The result is always valid
  UTF-8 text, so a JSON reply or a log line can always carry it; control
  characters stay as they are (JSON escapes them). It is for reading, not for
  going back to the path: nsd never opens a path it decoded this way.
"""

from __future__ import annotations

from collections.abc import Iterator


def decode(raw: bytes) -> str:
    """The display form of a name or path the kernel printed (the policy above)."""
    return raw.decode("utf-8", "backslashreplace")


def lines(data: bytes) -> Iterator[bytes]:
    """The lines of a /proc or cgroupfs file: split at "\\n" only, a final "\\n" ends the
    last line rather than starting an empty one."""
    if data.endswith(b"\n"):
        data = data[:-1]
    if data:
        yield from data.split(b"\n")


def cgroup_path(data: bytes) -> bytes | None:
    """The path in systemd's hierarchy from ``/proc/PID/cgroup``: the v2 line
    ``0::PATH``, or on hybrid hosts without it the v1 ``N:name=systemd:PATH`` line.

    Every line is ``ID:CONTROLLERS:PATH``; the path is what follows the second ":"
    and may itself hold ":" and "\\r". A line counts only if its ID is decimal and
    its path absolute, so nothing a tenant writes into a path can pass for a line.
    """
    v1 = None
    for line in lines(data):
        hid, _, rest = line.partition(b":")
        controllers, sep, path = rest.partition(b":")
        if not sep or not hid.isdigit() or not path.startswith(b"/"):
            continue
        if hid == b"0" and controllers == b"":
            return path
        if controllers == b"name=systemd" and v1 is None:
            v1 = path
    return v1


def within(path: bytes, base: bytes) -> bool:
    """Whether cgroup ``path`` is ``base`` or below it (a prefix ending at a "/")."""
    return path == base or path.startswith(base.rstrip(b"/") + b"/")


def ancestors(path: bytes) -> Iterator[bytes]:
    """``path`` and each parent up to (not including) "/": ``/a/b`` gives ``/a/b``, ``/a``.

    Every step cuts at a "/" strictly inside the path, so it ends whatever the path
    holds (a relative path yields itself only).
    """
    while path and path != b"/":
        yield path
        cut = path.rfind(b"/")
        if cut <= 0:
            return
        path = path[:cut]


def unescape_octal(field: bytes) -> bytes:
    """A field of ``mountinfo`` (or ``mounts``): the kernel writes space, tab, "\\n"
    and "\\\\" as a backslash and three octal digits; anything else is as it was."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == 0x5C and len(octal) == 3 and all(0x30 <= c <= 0x37 for c in octal):
            value = int(octal, 8)
            if value < 256:
                out.append(value)
                i += 4
                continue
        out.append(field[i])
        i += 1
    return bytes(out)


def stat_fields(data: bytes) -> list[bytes]:
    """Fields 3 and on of ``/proc/PID/stat`` (state, ppid, ...): comm, field 2, is
    printed raw between parentheses and may hold spaces, ")" and "\\n", so the
    fields start after the *last* ")". Empty if there is none."""
    end = data.rfind(b")")
    return [] if end < 0 else data[end + 1 :].split()
