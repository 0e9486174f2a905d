"""A throwaway Debian root: an overlay of a cached minimal root, used through
chroot in a private mount namespace (the overlay, /proc and /dev vanish with it).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

SETUP = """
set -e
mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {merged}
mount -t proc proc {merged}/proc
mount --rbind /dev {merged}/dev
mount -t tmpfs tmpfs {merged}/run
cp /etc/resolv.conf {merged}/etc/resolv.conf
mkdir -p {merged}/debs && cp {debs}/*.deb {merged}/debs/
"""


class Root:
    """Commands run in the root with ``sh``; its files persist across calls."""

    def __init__(self, lower: Path, debs: Path) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="nsd-pkgroot-"))
        for d in ("upper", "work", "merged"):
            (self.tmp / d).mkdir()
        self.lower = lower
        self.debs = debs

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        t = self.tmp
        setup = SETUP.format(
            lower=lower_q(self.lower), upper=t / "upper", work=t / "work", merged=t / "merged",
            debs=shlex.quote(str(self.debs)),
        )  # fmt: skip
        inner = (
            "export LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive"
            " PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        )
        full = setup + f"exec chroot {t / 'merged'} /bin/sh -ec {shlex.quote(inner + script)}\n"
        res = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", full],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if check:
            assert res.returncode == 0, (
                f"{script}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
            )
        return res

    def exists(self, path: str) -> bool:
        return self.sh(f"test -e {shlex.quote(path)}", check=False).returncode == 0

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def lower_q(path: Path) -> str:
    return shlex.quote(str(path))
