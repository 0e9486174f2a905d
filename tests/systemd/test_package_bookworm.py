"""The .deb on Debian 12 under Debian 12's own systemd (252) as PID 1.

The package tier (tests/package) installs the package into chroots, where no
systemd runs: the maintainer scripts' unit handling and socket activation are
not exercised there. Here the package tier's minimal bookworm root (an overlay
of the cached debootstrap root, scripts/pkg-root) gets what a booted host has
(systemd-sysv, dbus) and, while the chroot still has the network, apt fetches
what the package depends on (``--download-only``). The tree is then booted with
systemd-nspawn (``--private-network``: nothing reaches the host), and inside it,
without network, ``apt-get install ./nsd_<version>.deb`` installs nftables and
nsd; ``nsd.socket`` listens, ``nsd.service`` does not run until the first
``nsctl create``, which starts it through the socket; ``nsctl show`` then has
the tenant with its namespace.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn import ROOT, Container

sys.path.insert(0, str(ROOT))
from tests.package.chroot import Root

pytestmark = pytest.mark.slow


def script(*argv: str) -> str:
    """The last line a script of the repository printed (the path it made)."""
    res = subprocess.run([str(ROOT / "scripts" / argv[0]), *argv[1:]],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bookworm(boot: type[Container]) -> Iterator[tuple[Container, Path]]:
    deb = Path(script("build-deb"))  # reused when the package tier built this tree
    debs = Path(tempfile.mkdtemp(prefix="nsd-bookworm-debs-"))
    (debs / deb.name).write_bytes(deb.read_bytes())
    root = Root(Path(script("pkg-root", "bookworm")), debs)
    container: Container | None = None
    try:
        # Booting needs systemd; nsd's dependencies only downloaded, not installed.
        root.sh(
            "apt-get -qq update >/dev/null\n"
            "apt-get -y -qq install --no-install-recommends systemd systemd-sysv dbus"
            " >/dev/null\n"
            f"apt-get -y -qq install --download-only /debs/{deb.name} >/dev/null\n"
            "useradd --create-home alice\n"
        )
        t = root.tmp
        container = boot(
            directory=t / "merged",
            setup=f"mount -t overlay overlay -o lowerdir={root.lower},upperdir={t / 'upper'},"
            f"workdir={t / 'work'} {t / 'merged'}",
        ).boot()
        yield container, deb
    finally:
        if container is not None:
            container.shutdown()
        root.cleanup()
        for f in debs.iterdir():
            f.unlink()
        debs.rmdir()


def test_install_socket_activation_create_and_get_on_debian_12(
    bookworm: tuple[Container, Path],
) -> None:
    c, deb = bookworm
    version = c.run(["systemctl", "--version"]).stdout.split()[1]
    assert version == "252", version
    assert c.run(["dpkg-query", "-W", "nftables"], check=False).returncode != 0
    out = c.run(
        ["apt-get", "-y", "install", f"./{deb.name}"],
        cwd="/debs",
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=300,
    ).stdout
    block = re.search(r"NEW packages will be installed:\n((?:  .*\n)+)", out)
    assert block and {"nftables", "nsd"} <= set(block.group(1).split()), out

    # The maintainer scripts under a running systemd: the socket only.
    assert c.run(["systemctl", "is-enabled", "nsd.socket"]).stdout.strip() == "enabled"
    assert c.run(["systemctl", "is-active", "nsd.socket"]).stdout.strip() == "active"
    enabled = c.run(["systemctl", "is-enabled", "nsd.service"], check=False).stdout.strip()
    active = c.run(["systemctl", "is-active", "nsd.service"], check=False).stdout.strip()
    assert (enabled, active) == ("disabled", "inactive")

    # The first call starts nsd through the socket. nsd answers while its start-up
    # reconcile runs; READY=1 (active) follows once that is done.
    c.run(["/usr/bin/nsctl", "create", "alice"], timeout=120)
    c.run(["sh", "-c", "until systemctl -q is-active nsd.service; do sleep 0.1; done"])
    assert c.run(["systemctl", "is-active", "nsd.service"]).stdout.strip() == "active"
    tenant = json.loads(c.run(["/usr/bin/nsctl", "show", "alice", "--json"]).stdout)
    assert tenant["name"] == "alice" and tenant["state"] == "ready", tenant
    netns = c.run(["stat", "-L", "-c", "%i", "/run/netns/alice"]).stdout.strip()
    assert tenant["namespaceInode"] == int(netns)
    print(f"Debian 12: {deb.name} installed, nsd {c.run(['/usr/sbin/nsd', '--version']).stdout}")
