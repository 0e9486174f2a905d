"""Installing contrib/systemd into a test container the way an operator does.

nsd at /opt/nsd
---------------
The units name /opt/nsd/bin/{nsd,nsctl,nsd-exec,nsd-ensure}. The container binds
read-only at /opt/nsd what ``make -C native install DESTDIR=.cache/native-install
PREFIX=/opt/nsd`` made (nsd-exec and nsd-ensure as an operator installs them) plus
copies of the console scripts pip generated in the project's venv for nsd's entry
points (nsd.daemon:main, nsd.cli:main), which run this checkout's code (an editable
install; the checkout is bound at its own path inside, so the scripts'
``#!/work/main/.venv/bin/python`` resolves). So the binaries are the real ones, with no
network. An operator's ``pip install`` into /opt/nsd is exercised by the VM tier.

php-fpm
-------
php-fpm@.service names Debian's /usr/sbin/php-fpm8.2, which this host does not have,
and ``systemd-analyze verify`` checks that ExecStart= is executable. Rather than point
the unit at a stand-in, the test fetches Debian's own package with ``apt-get download``
(signature-checked by apt through the host's package lists), unpacks it into
``.cache/contrib-units`` and lays it over the container's /usr with
``--overlay-ro=/usr:<unpacked>/usr:/usr``: the real binary at its real path, and nothing
installed on the host. If the host has the binary, it is used as it is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from nspawn import ROOT, Container

CONTRIB = ROOT / "contrib" / "systemd"
CACHE = ROOT / ".cache" / "contrib-units"
UNIT_DIR = "/etc/systemd/system"
NATIVE_STAGE = ROOT / ".cache" / "native-install"


def _install_native() -> Path:
    """/opt/nsd as the container sees it: native/'s programs as `make install` puts them
    under PREFIX=/opt/nsd, next to the venv's console scripts for nsd and nsctl."""
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / "native"), "install", f"DESTDIR={NATIVE_STAGE}",
         "PREFIX=/opt/nsd", "PAMDIR=/opt/nsd/lib/security"],
        check=True, capture_output=True,
    )  # fmt: skip
    opt = NATIVE_STAGE / "opt" / "nsd"
    for script in ("nsd", "nsctl"):
        shutil.copy2(ROOT / ".venv" / "bin" / script, opt / "bin" / script)
    return opt


# A bind, not an overlay: nspawn creates a bind's mount point in the volatile root
# (it has no /opt), but not an overlay's.
VENV_AT_OPT = f"--bind-ro={_install_native()}:/opt/nsd"
_PHP_FPM = re.compile(r"/usr/sbin/php-fpm(\d+\.\d+)\b")


def contrib_unit_files() -> list[Path]:
    return sorted(
        p for p in CONTRIB.iterdir() if p.suffix in (".service", ".socket", ".slice", ".target")
    )


def php_fpm_binaries() -> dict[str, str]:
    """Binary path -> Debian package, for every php-fpm the contrib units run."""
    found: dict[str, str] = {}
    for unit in contrib_unit_files():
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                for match in _PHP_FPM.finditer(line):
                    found[match.group(0)] = f"php{match.group(1)}-fpm"
    return found


def overlay_for_php_fpm() -> tuple[list[str], str | None]:
    """nspawn arguments that make the php-fpm binaries exist; or a reason why not."""
    missing = {b: p for b, p in php_fpm_binaries().items() if not os.access(b, os.X_OK)}
    if not missing:
        return [], None
    root = CACHE / "root"
    for binary, package in missing.items():
        if (root / binary.lstrip("/")).exists():
            continue
        reason = _unpack(package, root)
        if reason is not None:
            return [], reason
        if not (root / binary.lstrip("/")).exists():
            return [], f"Debian package {package} has no {binary}"
    return [f"--overlay-ro=/usr:{root / 'usr'}:/usr"], None


def _unpack(package: str, root: Path) -> str | None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        download = subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        debs = list(Path(tmp).glob("*.deb"))
        if download.returncode != 0 or len(debs) != 1:
            return f"apt-get download {package} failed: {download.stderr.strip()[-500:]}"
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        # Merge into the cache atomically per package (another run may do the same).
        target = root.parent / f"root.{os.getpid()}"
        if root.exists():
            shutil.copytree(root, target, symlinks=True)
        shutil.copytree(unpacked, target, symlinks=True, dirs_exist_ok=True)
        if root.exists():
            shutil.rmtree(root)
        target.rename(root)
    return None


def install_units(c: Container) -> None:
    """Copy every unit of contrib/systemd to /etc/systemd/system and reload."""
    c.run(["cp", *map(str, contrib_unit_files()), UNIT_DIR])
    c.run(["systemctl", "daemon-reload"])


TENANT_APP = (
    "#!/bin/sh\n# the tenant's own program: here, something that just runs\nexec sleep infinity\n"
)


def add_tenant_user(c: Container, user: str) -> int:
    """A Unix user with a home and ~/bin/tenant-app (what tenant-app@.service runs)."""
    c.run(["useradd", "--create-home", "--shell", "/bin/sh", user])
    app = f"/home/{user}/bin/tenant-app"
    c.run(["install", "-d", "-o", user, "-g", user, f"/home/{user}/bin"])
    c.run(["sh", "-c", 'printf "%s" "$1" > "$2"', "sh", TENANT_APP, app])
    c.run(["chown", f"{user}:{user}", app])
    c.run(["chmod", "0755", app])
    return int(c.run(["id", "-u", user]).stdout)
