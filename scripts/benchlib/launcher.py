"""Comparison 1: what starting a workload in a tenant's namespace costs.

Variants, each starting ``/bin/true`` as the tenant inside the tenant's namespace:

* ``nsd-exec``, the C program of native/ (``make -C native``, as installed by
  ``make install``): the headline number;
* the seed's wrapper script, verbatim (``sudo -iu USER true``, then
  ``nsenter --net=/var/run/netns/usr_USER --setuid=$(id -u) --setgid=$(id -g)``);
* bare ``nsenter --net=… --setuid --setgid /bin/true``: the floor.

All variants run in one loop, one start of each per round in a rotating order, so
drift (page cache, CPU frequency, other load) hits all of them alike. Starts use
``posix_spawn`` and ``waitpid`` with /dev/null as stdio and a service manager's small
environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .env import RUN_NETNS, Cleanup
from .stats import ratio, summarize

#: The seed's script (000_*.txt, "uberspace-wrap-netns.sh"), character for character.
WRAPPER_SCRIPT = """\
#!/usr/bin/sh
# gekürzte Version ohne Error-Handling.

usr=$1; shift

# create namespace
/usr/bin/sudo -iu "$usr" /usr/bin/true

exec /usr/bin/nsenter \\
  --net=/var/run/netns/usr_$usr \\
  --setuid=$(id -u "$usr") --setgid=$(id -g "$usr") \\
  "$@"
"""

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
ROOT = Path(__file__).resolve().parents[2]
NSD_EXEC = ROOT / "native" / "build" / "nsd-exec"


def _spawn_ms(argv: list[str], devnull: int) -> float:
    fa = [
        (os.POSIX_SPAWN_DUP2, devnull, 0),
        (os.POSIX_SPAWN_DUP2, devnull, 1),
        (os.POSIX_SPAWN_DUP2, devnull, 2),
    ]
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, ENV, file_actions=fa)
    _, status = os.waitpid(pid, 0)
    dt = (time.perf_counter() - t0) * 1000
    if status != 0:
        res = subprocess.run(argv, capture_output=True, text=True, env=ENV, check=False)
        raise RuntimeError(f"{' '.join(argv)}: exit status {status}: {res.stderr.strip()}")
    return dt


#: display names of the variants, in table order
LABELS = {
    "nsd-exec": "nsd-exec (C, native/)",
    "wrapper": "wrapper script (sudo + nsenter)",
    "nsenter": "bare nsenter (floor)",
}


def run_launcher(
    cleanup: Cleanup,
    prefix: str,
    socket_path: str,
    user: str,
    *,
    uid: int,
    gid: int,
    rounds: int,
    warmup: int,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-launch-"))
    cleanup.push(f"remove {workdir}", lambda: shutil.rmtree(workdir, ignore_errors=True))
    wrapper = workdir / "uberspace-wrap-netns.sh"
    wrapper.write_text(WRAPPER_SCRIPT)
    wrapper.chmod(0o755)
    netns = f"{RUN_NETNS}/usr_{user}"
    variants: dict[str, list[str]] = {
        "nsd-exec": [str(NSD_EXEC), "--socket", socket_path, user, "--", "/bin/true"],
        "wrapper": [str(wrapper), user, "/bin/true"],
        "nsenter": [
            "/usr/bin/nsenter",
            f"--net={netns}",
            f"--setuid={uid}",
            f"--setgid={gid}",
            "/bin/true",
        ],
    }
    # Where the time goes: pieces of the above, measured in the same loop.
    anatomy: dict[str, list[str]] = {
        "sh -c :": ["/bin/sh", "-c", ":"],
        "sudo -iu USER true": ["/usr/bin/sudo", "-iu", user, "/usr/bin/true"],
        "/bin/true": ["/bin/true"],
    }
    allv = {**variants, **anatomy}
    names = list(allv)
    samples: dict[str, list[float]] = {k: [] for k in names}
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for _ in range(warmup):
            for k in names:
                _spawn_ms(allv[k], devnull)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for k in order:
                samples[k].append(_spawn_ms(allv[k], devnull))
    finally:
        os.close(devnull)
    summary = {k: summarize(v) for k, v in samples.items()}
    wrap = summary["wrapper"]["median"]
    floor = summary["nsenter"]["median"]
    return {
        "rounds": rounds,
        "warmup_rounds": warmup,
        "install": "make -C native (native/build/nsd-exec)",
        "labels": {k: LABELS[k] for k in variants},
        "variants_ms": {k: summary[k] for k in variants},
        "anatomy_ms": {k: summary[k] for k in anatomy},
        "ratio_to_wrapper": {k: ratio(summary[k]["median"], wrap) for k in variants},
        "minus_nsenter_ms": {k: summary[k]["median"] - floor for k in variants},
        "wrapper_script": WRAPPER_SCRIPT,
        "systemd_native_template": {
            "status": "not measured",
            "reason": "no systemd as PID 1 on this host; the VM e2e tier (scripts/vm-test) "
            "measures it (see --vm-figures)",
            "expected_added_cost_ms": 0,
        },
    }
