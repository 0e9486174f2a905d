"""The package tier: build the .deb, check it with lintian, install, upgrade,
remove and purge it on minimal Debian 12 and 13 roots (overlays of cached
debootstrap roots, in a private mount namespace: nothing of the host changes).

Needs root (debootstrap, chroot, overlay mounts) and the package archive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            item.add_marker(pytest.mark.skip(reason="the package tier needs root"))


def build(version: str | None, out: Path) -> Path:
    args = [str(ROOT / "scripts" / "build-deb")] + (["--version", version] if version else [])
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    deb = Path(res.stdout.strip().splitlines()[-1])
    target = out / deb.name
    shutil.copy(deb, target)
    shutil.copy(deb.parent / "lintian.txt", out / f"lintian-{version or 'base'}.txt")
    return target


@pytest.fixture(scope="session")
def debs() -> Iterator[dict[str, Path]]:
    """The package as checked out, and the same tree rebuilt as a newer version."""
    out = Path(tempfile.mkdtemp(prefix="nsd-debs-"))
    try:
        yield {"base": build(None, out), "next": build("99.0.0", out), "dir": out}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def cached_root(suite: str) -> Path:
    res = subprocess.run(
        [str(ROOT / "scripts" / "pkg-root"), suite], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return Path(res.stdout.strip().splitlines()[-1])
