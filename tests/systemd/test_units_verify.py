"""Every unit of contrib/systemd passes ``systemd-analyze verify`` (systemd 252), in a
container where what the units name exists at the paths they name.

- /opt/nsd/bin/{nsd,nsctl,nsd-exec}: nsd's real entry points (see contrib_units.py);
- /usr/sbin/php-fpm8.2: Debian's real php-fpm, unpacked from its package over the
  container's /usr (contrib_units.py); nothing is installed on the host. Without
  network and without the binary on the host the php-fpm units are skipped, saying so.
- /home/web-shop/bin/tenant-app: the program tenant-app@.service runs for web-shop.

Templates are verified as instances for a user with a dash in its name
(``php-fpm@web-shop.service``), which also loads and checks what they depend on
(nsd-tenant@web-shop.service, nsd.socket, the slice). Verification must be silent:
any warning fails the test, which also shows that systemd 252 ignores
``X-NSD-Tenant=yes`` without a word. ``--man=no``: the host has no manual pages
installed, and verify would fail on every ``Documentation=man:...`` for that reason
alone (their syntax is still checked).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from contrib_units import (
    VENV_AT_OPT,
    add_tenant_user,
    contrib_unit_files,
    install_units,
    overlay_for_php_fpm,
)
from nspawn import Container

pytestmark = pytest.mark.slow

USER = "web-shop"


def _units() -> list[str]:
    names = []
    for path in contrib_unit_files():
        name = path.name
        names.append(name.replace("@.", f"@{USER}.") if "@." in name else name)
    return names


UNITS = _units()
PHP_FPM_UNITS = {u for u in UNITS if u.startswith("php-fpm")}


@pytest.fixture(scope="module")
def verifier(boot: type[Container]) -> Iterator[tuple[Container, str | None]]:
    started = time.monotonic()
    overlay, php_fpm_missing = overlay_for_php_fpm()
    c = boot([VENV_AT_OPT, *overlay]).boot()
    try:
        install_units(c)
        add_tenant_user(c, USER)
        print(f"verify container ready in {time.monotonic() - started:.1f} s")
        yield c, php_fpm_missing
    finally:
        c.shutdown()


def test_all_contrib_units_are_covered() -> None:
    assert {
        "nsd.service",
        "nsd.socket",
        "tenant.slice",
        f"nsd-tenant@{USER}.service",
        f"php-fpm@{USER}.service",
        f"php-fpm-exec@{USER}.service",
        f"tenant-app@{USER}.service",
        f"tenant-app-exec@{USER}.service",
    } <= set(UNITS)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_a_word(verifier: tuple[Container, str | None], unit: str) -> None:
    c, php_fpm_missing = verifier
    if unit in PHP_FPM_UNITS and php_fpm_missing:
        pytest.skip(f"php-fpm binary not available: {php_fpm_missing}")
    result = c.run(["systemd-analyze", "verify", "--man=no", unit], check=False)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", ""), result.stderr


def test_the_binaries_are_nsds_own(verifier: tuple[Container, str | None]) -> None:
    c, _ = verifier
    for tool in ("nsd", "nsctl"):
        text = c.run(["cat", f"/opt/nsd/bin/{tool}"]).stdout
        module = {"nsd": "nsd.daemon", "nsctl": "nsd.cli"}[tool]
        assert f"from {module} import main" in text, text
    assert "usage" in c.run(["/opt/nsd/bin/nsctl", "--help"]).stdout.lower()
    for tool in ("nsd-exec", "nsd-ensure"):  # native/, as `make install` puts them
        assert c.run([f"/opt/nsd/bin/{tool}", "--help"]).stdout.startswith(f"usage: {tool}")


def test_verify_would_catch_a_warning(verifier: tuple[Container, str | None]) -> None:
    """The check above is not vacuous: an unknown key (no X- prefix) is reported."""
    c, _ = verifier
    c.run(
        [
            "sh",
            "-c",
            "sed 's/^X-NSD-Tenant=yes$/NSD-Tenant=yes/' /etc/systemd/system/tenant-app@.service"
            " > /etc/systemd/system/probe-app@.service",
        ]
    )
    try:
        result = c.run(
            ["systemd-analyze", "verify", "--man=no", f"probe-app@{USER}.service"], check=False
        )
        assert "Unknown key name 'NSD-Tenant'" in result.stderr or "NSD-Tenant" in result.stderr
    finally:
        c.run(["rm", "-f", "/etc/systemd/system/probe-app@.service"])
