"""nsctl's bash completion offers the tenants a real daemon lists."""

from __future__ import annotations

from pathlib import Path

from tests.harness import PY, daemon_env
from tests.unit.test_completion import complete

T = "io.nsd.Tenant."


def test_tenant_names_come_from_the_daemon() -> None:
    venv_bin = str(Path(PY).parent)  # the real nsctl of this checkout
    with daemon_env() as (d, users):
        d.start()
        names = [users.add("c1"), users.add("c2")]
        for name in names:
            d.call(T + "Create", name=name)
        prefix = users.prefix
        assert complete("--socket", d.socket, "show", prefix, path=venv_bin) == sorted(names)
        assert complete("limits", "--socket", d.socket, names[0], path=venv_bin) == [names[0]]
        # one tenant per command: nothing more after it
        assert complete("show", names[0], "--socket", d.socket, "", path=venv_bin) == []
        for name in names:
            d.call(T + "Remove", name=name, force=True)
        assert complete("--socket", d.socket, "show", prefix, path=venv_bin) == []
        assert d.stop() == 0
