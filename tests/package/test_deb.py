"""The .deb as an operator meets it: lintian-clean, installs with apt on minimal
Debian 12 and 13 roots (pulling nftables and the rest from the archive),
upgrades keeping configuration and state, removes keeping them, purges them."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.package.chroot import Root
from tests.package.conftest import cached_root

SUITES = ("bookworm", "trixie")


@pytest.fixture(params=SUITES)
def root(request: pytest.FixtureRequest, debs: dict[str, Path]) -> Iterator[Root]:
    r = Root(cached_root(request.param), debs["dir"])
    try:
        yield r
    finally:
        r.cleanup()


def install(root: Root, deb: Path) -> None:
    root.sh(
        "apt-get -qq update >/dev/null\n"
        f"apt-get -y -qq -o Dpkg::Options::=--force-confold install /debs/{deb.name} >/dev/null"
    )


def test_lintian_reports_no_error_or_warning(debs: dict[str, Path]) -> None:
    report = (debs["dir"] / "lintian-base.txt").read_text().splitlines()
    assert [line for line in report if line[:2] in ("E:", "W:")] == []


def maintainer_scripts(deb: Path, tmp: Path) -> dict[str, str]:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp)], check=True)
    names = ("preinst", "postinst", "prerm", "postrm")
    return {n: (tmp / n).read_text() for n in names if (tmp / n).exists()}


def test_maintainer_scripts_never_stop_tenants_or_the_socket_on_upgrade(
    debs: dict[str, Path], tmp_path: Path
) -> None:
    """An upgrade restarts nsd.service and nothing else: stopping tenant.slice would
    stop every tenant's services below it (debhelper's default for --no-start units
    did exactly that in the preinst), and restarting nsd.socket would drop the
    listening socket and restart nsd twice. Removal stops nsd and its socket only."""
    scripts = maintainer_scripts(debs["base"], tmp_path)
    text = "\n".join(scripts.values())
    actions = re.findall(r"deb-systemd-invoke (\S+) (.*?) >", text)
    assert "preinst" not in scripts or "deb-systemd-invoke" not in scripts["preinst"]
    for action, units in actions:
        named = set(re.findall(r"'([^']+)'", units))
        assert not named & {"tenant.slice", "nsd-tenant@.service"}, (action, units)
        if action in ("restart", "$_dh_action"):
            assert named <= {"nsd.service", "nsd.socket"}, units
    # The socket: started (a no-op when listening), not restarted on upgrade.
    post = scripts["postinst"]
    assert re.search(r"deb-systemd-invoke start 'nsd.socket'", post), post
    assert re.search(r"deb-systemd-invoke \$_dh_action 'nsd.service' >", post), post
    assert "pam-auth-update --package\n" in post
    assert "pam-auth-update --package --remove nsd" in scripts["prerm"]


def test_install_upgrade_remove_purge(root: Root, debs: dict[str, Path]) -> None:
    """The whole life of the package on one root (one apt session per step)."""
    assert not root.exists("/usr/sbin/nft")  # a minimal root: apt must bring nftables
    install(root, debs["base"])
    out = root.sh(
        "nsd --version; nsd --check-config; nsctl --help | head -n1\n"
        "nsd-exec --help 2>&1 | head -n1 || true; nft --version\n"
        "dpkg -L nsd | grep -E 'pam_nsd.so|nsd.8|nsd.toml.5|nsctl.8|nsd-exec.8|pam_nsd.8|"
        "completions/nsctl|pam-configs/nsd|nsd.service|nsd.socket' | sort\n"
        # no systemd in a minimal root: enabling is the [Install] symlink
        "for u in sockets.target.wants/nsd.socket multi-user.target.wants/nsd.service; do"
        " test -L /etc/systemd/system/$u && echo enabled || echo disabled; done\n"
        "ldd $(dpkg -L nsd | grep pam_nsd.so) | grep -c 'not found' || true\n"
    ).stdout.splitlines()
    assert out[0].startswith("nsd ")
    assert out[1] == "nsd: configuration OK (/etc/nsd/nsd.toml)"
    assert out[2].startswith("usage: nsctl")
    assert "nsd-exec" in out[3]
    assert out[4].startswith("nftables v")
    listed = [Path(p).name for p in out[5:-3]]
    assert sorted(listed) == sorted([
        "nsctl", "nsctl.8.gz", "nsd-exec.8.gz", "nsd.8.gz", "nsd.service", "nsd.socket",
        "nsd.toml.5.gz", "pam_nsd.8.gz", "pam_nsd.so", "nsd",
    ]), out  # fmt: skip
    # Socket activation is the polite default: nothing runs until asked.
    assert out[-3:-1] == ["enabled", "disabled"]
    assert out[-1] == "0"  # pam_nsd.so resolves every library it links

    # Upgrade: the operator's configuration change and the state survive.
    root.sh(
        "sed -i 's/^#admin_group = .*/admin_group = \"root\"/' /etc/nsd/nsd.toml\n"
        "mkdir -p /var/lib/nsd && echo state > /var/lib/nsd/marker\n"
    )
    install(root, debs["next"])
    out = root.sh(
        "dpkg-query -W -f '${Version}\\n' nsd; grep '^admin_group' /etc/nsd/nsd.toml\n"
        "cat /var/lib/nsd/marker; nsd --check-config"
    ).stdout.splitlines()
    assert out == [
        "99.0.0",
        'admin_group = "root"',
        "state",
        "nsd: configuration OK (/etc/nsd/nsd.toml)",
    ]

    # Remove keeps configuration and state; purge deletes both.
    root.sh("apt-get -y -qq remove nsd >/dev/null")
    assert not root.exists("/usr/sbin/nsd")
    assert root.exists("/var/lib/nsd/marker") and root.exists("/etc/nsd/nsd.toml")
    root.sh("apt-get -y -qq purge nsd >/dev/null")
    assert not root.exists("/var/lib/nsd") and not root.exists("/etc/nsd")
