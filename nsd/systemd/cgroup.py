"""Reading systemd's cgroup tree: which processes a unit's cgroup holds.

systemd mirrors units in its hierarchy: cgroup v2 at /sys/fs/cgroup (or
/sys/fs/cgroup/unified on hybrid hosts, where v1's name=systemd tree at
/sys/fs/cgroup/systemd is authoritative). Plain file reads, no subprocesses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from nsd import kerneltext

CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def pids_in(path: str, roots: tuple[str, ...] = CGROUP_ROOTS) -> list[int]:
    """PIDs in the cgroup at ``path`` and below, from the first hierarchy that has it."""
    for root in roots:
        base = root + path
        if not os.path.isdir(base):
            continue
        if root == "/sys/fs/cgroup" and not os.path.exists(os.path.join(root, "cgroup.procs")):
            continue  # a v1 tmpfs, not a hierarchy
        return sorted(pid for _, pids in walk_procs(base) for pid in pids)
    return []


def walk_procs(base: str) -> Iterator[tuple[str, list[int]]]:
    """(directory, PIDs of its ``cgroup.procs``) for the cgroup at ``base`` and below.

    An explicit stack, not os.walk: in Python 3.11 os.walk recurses, and a delegated
    subtree may nest deeper than the recursion limit. A cgroup that goes away while
    it is walked is skipped.
    """
    stack = [base]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
            with open(os.path.join(directory, "cgroup.procs"), "rb") as f:
                data = f.read()
        except OSError:
            continue
        yield directory, [int(line) for line in kerneltext.lines(data) if line.isdigit()]
