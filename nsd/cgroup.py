"""Reading systemd's cgroup tree: which processes a unit's cgroup holds.

systemd mirrors units in its hierarchy: cgroup v2 at /sys/fs/cgroup (or
/sys/fs/cgroup/unified on hybrid hosts, where v1's name=systemd tree at
/sys/fs/cgroup/systemd is authoritative). Plain file reads, no subprocesses.
"""

from __future__ import annotations

import os

CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def pids_in(path: str, roots: tuple[str, ...] = CGROUP_ROOTS) -> list[int]:
    """PIDs in the cgroup at ``path`` and below, from the first hierarchy that has it."""
    for root in roots:
        base = root + path
        if not os.path.isdir(base):
            continue
        if root == "/sys/fs/cgroup" and not os.path.exists(os.path.join(root, "cgroup.procs")):
            continue  # a v1 tmpfs, not a hierarchy
        pids: set[int] = set()
        for directory, _dirs, files in os.walk(base):
            if "cgroup.procs" not in files:
                continue
            try:
                with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as f:
                    pids.update(int(line) for line in f if line.strip())
            except OSError:
                continue  # the cgroup went away while we walked
        return sorted(pids)
    return []
