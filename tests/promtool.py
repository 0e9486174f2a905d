"""Prometheus's promtool for the tests: $NSD_PROMTOOL (set by scripts/test), one on
PATH, or the one scripts/promtool unpacks from Debian's package into .cache."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def promtool() -> str | None:
    found = os.environ.get("NSD_PROMTOOL") or shutil.which("promtool")
    if found:
        return found
    script = ROOT / "scripts" / "promtool"
    try:
        done = subprocess.run([str(script), "--print-path"], capture_output=True, text=True,
                              timeout=300, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None
