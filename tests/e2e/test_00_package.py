"""nsd installed the way an operator installs it (phase 1, before every other test).

The VM root is a minimal Debian 13 without nsd, without nftables, without a
compiler and without network; its only apt source is a local repository of
Debian's own packages (scripts/vm/build-repo). scripts/vm/prepare-guest ran
``apt-get install ./nsd_<N>.deb`` in it, cut off from any network, and kept
apt's output (INSTALL_LOG): apt had to resolve the package's ``Depends:`` from
that repository. (In the booted VM under TCG that install took 150 s that
phase 1 cannot spare; test_99_package.py upgrades, removes and reinstalls in
the booted VM.) Here, under the booted systemd: the polite default (the socket
listening, the daemon not running, the firewall untouched), the programs and
units where the package puts them; then the operator's part of
docs/operator-guide.md: the configuration file, the tenant templates from the
examples, ``nsd.service`` enabled for boot. Every later test uses these
installed programs and units.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    DEBS,
    NSCTL,
    NSD,
    NSD_ENSURE,
    NSD_EXEC,
    installed_version,
    is_active,
    package_files,
    run,
    show,
    version_of,
)

pytestmark = pytest.mark.phase1

CONFIG = Path("/etc/nsd/nsd.toml")
INSTALL_LOG = Path("/var/lib/nsd-e2e/install.log")
EXAMPLES = Path("/usr/share/doc/nsd/examples")
# The tenant templates the tests use (test_50, test_90, test_99), copied where
# the operator guide says (docs/systemd.md).
TEMPLATES = ("tenant-app@.service", "tenant-app-exec@.service")


def depends(deb: Path) -> list[str]:
    """Package names in the .deb's Depends: (first of each alternative)."""
    field = run("dpkg-deb", "-f", str(deb), "Depends").stdout
    return [re.split(r"[\s(:]", dep.strip().split("|")[0].strip())[0] for dep in field.split(",")]


def test_the_guest_has_no_compiler_no_development_venv_and_no_network() -> None:
    for compiler in ("cc", "gcc", "clang"):
        assert shutil.which(compiler) is None, compiler
    assert not Path("/opt/nsd").exists()  # no development venv either
    # apt knows only the local repository, and the VM has no route anywhere.
    files = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").iterdir()]
    sources = [
        line
        for f in files
        if f.exists()
        for line in f.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert sources == ["deb [trusted=yes] file:/var/local/nsd-e2e/repo ./"], sources
    for family in ("-4", "-6"):
        assert run("ip", family, "route", "show", "default").stdout.strip() == ""


def test_apt_installed_the_package_and_its_dependencies(figures: dict[str, Any]) -> None:
    deb, _ = package_files()
    out = INSTALL_LOG.read_text()
    # "The following NEW packages will be installed:" and its indented lines:
    # nftables among them, so it was not there before.
    block = re.search(r"NEW packages will be installed:\n((?:  .*\n)+)", out)
    assert block, out
    new = sorted(block.group(1).split())
    figures["package_install"] = {"deb": deb.name, "new_packages": new, "depends": depends(deb)}
    assert "nftables" in new and "nsd" in new, out
    assert installed_version("nsd") == version_of(deb)
    # Everything Depends: names is there now (nftables from the local repository).
    missing = [p for p in depends(deb) if installed_version(p) is None]
    assert missing == [], missing


def test_programs_module_and_units_are_where_the_package_puts_them() -> None:
    for program in (NSD, NSCTL, NSD_EXEC, NSD_ENSURE):
        assert Path(program).is_file(), program
    assert run(NSD, "--version").stdout.startswith("nsd ")
    assert run(NSD, "--check-config").stdout.strip() == f"nsd: configuration OK ({CONFIG})"
    module = sorted(Path("/usr/lib").glob("*/security/pam_nsd.so"))
    assert len(module) == 1, module
    assert "not found" not in run("ldd", str(module[0])).stdout
    units = Path("/usr/lib/systemd/system")  # /lib/systemd/system on merged-/usr
    for unit in ("nsd.service", "nsd.socket", "nsd-tenant@.service", "tenant.slice"):
        assert (units / unit).is_file(), unit
    for unit in ("nsd.service", "nsd.socket"):
        path = show(unit, "FragmentPath")["FragmentPath"]
        assert path in (f"/lib/systemd/system/{unit}", str(units / unit)), (unit, path)
    assert f"ExecStart={NSD}\n" in (units / "nsd.service").read_text()
    assert f"ExecStart={NSD_ENSURE} %i\n" in (units / "nsd-tenant@.service").read_text()


def test_the_socket_listens_the_daemon_does_not_run() -> None:
    """At boot after the install: nsd.socket enabled and listening, nsd.service
    neither enabled nor started, and so nothing of nsd on the host's firewall."""
    assert run("systemctl", "is-enabled", "nsd.socket").stdout.strip() == "enabled"
    assert is_active("nsd.socket") == "active"
    enabled = run("systemctl", "is-enabled", "nsd.service", check=False).stdout.strip()
    assert enabled == "disabled"
    assert is_active("nsd.service") == "inactive"
    assert "table inet nsd" not in run("nft", "list", "tables").stdout


def test_operator_configures_and_enables_nsd() -> None:
    """docs/operator-guide.md: edit the conffile, check it, install the tenant
    templates, enable nsd.service for boot (phase 2 needs it started at boot)."""
    text = CONFIG.read_text()
    # One budget per tenant (docs/logins.md), as the VM tier runs.
    assert '#parent_slice = "tenant.slice"\n' in text
    CONFIG.write_text(
        text.replace('#parent_slice = "tenant.slice"\n', 'parent_slice = "user.slice"\n')
    )
    assert run(NSD, "--check-config").returncode == 0
    for name in TEMPLATES:
        example = (EXAMPLES / name).read_text()
        assert "/opt/nsd" not in example
        Path("/etc/systemd/system", name).write_text(example)
    run("systemctl", "daemon-reload")
    run("systemctl", "enable", "--quiet", "nsd.service")
    assert run("systemctl", "is-enabled", "nsd.service").stdout.strip() == "enabled"
    assert sorted(p.name for p in DEBS.glob("*.deb")) == sorted(p.name for p in package_files())
