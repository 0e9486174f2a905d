"""What a daemon start imports: importing any part of pyroute2 runs its package's
``__init__``, which loads all of it (0.3-0.5 s of every start on a 2-CPU host, measured
with ``python -X importtime``); only tc and ``run_in_namespace`` need it, on first use."""

from __future__ import annotations

import subprocess
import sys


def test_daemon_start_does_not_import_pyroute2() -> None:
    code = "import sys, nsd.daemon; print(sorted(m for m in sys.modules if 'pyroute2' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
