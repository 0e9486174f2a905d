"""Where the tests find nsd's native programs (native/: nsd-exec, nsd-ensure, pam_nsd.so).

``scripts/test`` builds them (``make -C native all asan``) and runs the behavioural
tests twice: against the release build and, with ``NSD_NATIVE_BUILD`` set to
``native/build-asan``, against the AddressSanitizer + UBSan build.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = Path(os.environ.get("NSD_NATIVE_BUILD") or ROOT / "native" / "build").resolve()
SANITIZED = BUILD.name == "build-asan"


def native_program(name: str) -> Path:
    """The built program; a clear error (not a skip) if it was not built."""
    path = BUILD / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make -C native` (./scripts/test does)")
    return path


def asan_preload() -> dict[str, str]:
    """The environment a non-sanitized host program (pamtester) needs to load the
    sanitized pam_nsd.so: the ASan runtime first in the link map."""
    if not SANITIZED:
        return {}
    runtime = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return {"LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"}
