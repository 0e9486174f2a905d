"""Comparison 1: what starting a workload in a tenant's namespace costs.

Variants, each starting ``/bin/true`` as the tenant inside the tenant's namespace:

* ``nsd-exec`` from a NON-editable ``pip install`` into a temp venv (how operators
  install it): the headline number. That is bin/nsd-exec, the sh/Python launcher
  that runs the venv's interpreter with ``-IS``;
* pip's console-script launcher for ``nsd.exec:main`` in the same venv (what a
  ``[project.scripts]`` entry would install: ``site``, then ``import re``), to show
  what the launcher design saves;
* ``nsd-exec`` from the repository's editable ``.venv`` (what developers see: the
  launcher falls back to ``site`` there, and the editable install's ``.pth`` finder
  costs ~10 ms per start);
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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .env import RUN_NETNS, Cleanup, log
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


#: pip's console-script template (pip/_internal/operations/install/wheel.py), as pip
#: writes it for a ``[project.scripts]`` entry ``nsd-exec = "nsd.exec:main"``.
CONSOLE_SCRIPT = """\
#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from nsd.exec import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


class Install:
    """nsd pip-installed (not editable) into a temp venv from a copy of the checkout."""

    def __init__(self, venv: Path, how: str) -> None:
        self.venv = venv
        self.how = how
        self.python = str(venv / "bin/python")
        self.site = _site_packages(venv)
        #: what pip installed: bin/nsd-exec of the checkout
        self.launcher = str(venv / "bin/nsd-exec")
        #: the alternative, for comparison: pip's console script for nsd.exec:main
        self.console_script = str(venv / "bin/nsd-exec-console-script")
        Path(self.console_script).write_text(CONSOLE_SCRIPT.format(python=self.python))
        os.chmod(self.console_script, 0o755)  # noqa: S103 -- a launcher in a temp venv


def install_noneditable(cleanup: Cleanup, prefix: str) -> Install:
    """Built from a copy so pip's in-tree build never writes build/ into the checkout.
    If pip cannot build (no network for the build backend), the layout a wheel
    produces is made by hand: the package in site-packages and bin/nsd-exec."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-venv-"))
    cleanup.push(f"remove {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "nsd", src / "nsd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "bin", src / "bin")
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    res = subprocess.run(
        [
            str(venv / "bin/pip"),
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            str(src),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode == 0:
        how = "pip install --no-deps (wheel built from a copy of the checkout)"
    else:
        log(f"pip install failed, laying out the wheel by hand: {res.stderr.strip()[-300:]}")
        site = Path(_site_packages(venv))
        shutil.copytree(src / "nsd", site / "nsd")
        shutil.copy2(src / "bin/nsd-exec", venv / "bin/nsd-exec")  # a script-files entry
        how = "package copied into site-packages + bin/nsd-exec (pip failed)"
    # Byte-compiled as pip does, so no start pays for compiling.
    subprocess.run(
        [str(venv / "bin/python"), "-m", "compileall", "-q", _site_packages(venv) + "/nsd"],
        check=True,
    )
    return Install(venv, how)


def _site_packages(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


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
    "nsd-exec": "nsd-exec (pip install)",
    "console-script": "nsd.exec via pip's console script",
    "nsd-exec-editable": "nsd-exec (editable .venv)",
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
    current = install_noneditable(cleanup, prefix)
    netns = f"{RUN_NETNS}/usr_{user}"
    dev_py = sys.executable
    dev_exec = str(Path(dev_py).with_name("nsd-exec"))
    exec_args = ["--socket", socket_path, user, "--", "/bin/true"]
    variants: dict[str, list[str]] = {
        "nsd-exec": [current.launcher, *exec_args],
        "console-script": [current.console_script, *exec_args],
        "nsd-exec-editable": [dev_exec, *exec_args],
    }
    variants["wrapper"] = [str(wrapper), user, "/bin/true"]
    variants["nsenter"] = [
        "/usr/bin/nsenter",
        f"--net={netns}",
        f"--setuid={uid}",
        f"--setgid={gid}",
        "/bin/true",
    ]

    def import_only(inst: Install) -> list[str]:
        code = f"import sys; sys.path.append({inst.site!r}); import nsd.exec"
        return [inst.python, "-IS", "-c", code]

    # Where the time goes: pieces of the above, measured in the same loop.
    anatomy: dict[str, list[str]] = {
        "sh -c :": ["/bin/sh", "-c", ":"],
        "python -IS -c pass": [current.python, "-IS", "-c", "pass"],
        "python -c pass (venv)": [current.python, "-c", "pass"],
        "python -c pass (editable .venv)": [dev_py, "-c", "pass"],
        "python -IS, import nsd.exec": import_only(current),
    }
    anatomy["sudo -iu USER true"] = ["/usr/bin/sudo", "-iu", user, "/usr/bin/true"]
    anatomy["/bin/true"] = ["/bin/true"]
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
    # The launcher's Python part as its sh line starts it (the sh line cannot pass -X).
    importtimes = {
        "nsd-exec": importtime([current.python, "-X", "importtime", "-IS", *variants["nsd-exec"]]),
        "console-script": importtime(
            [current.python, "-X", "importtime", *variants["console-script"]]
        ),
        "nsd-exec-editable": importtime(
            [dev_py, "-X", "importtime", "-IS", *variants["nsd-exec-editable"]]
        ),
    }
    return {
        "rounds": rounds,
        "warmup_rounds": warmup,
        "install": current.how,
        "labels": {k: LABELS[k] for k in variants},
        "variants_ms": {k: summary[k] for k in variants},
        "anatomy_ms": {k: summary[k] for k in anatomy},
        "ratio_to_wrapper": {k: ratio(summary[k]["median"], wrap) for k in variants},
        "minus_nsenter_ms": {k: summary[k]["median"] - floor for k in variants},
        "importtime": importtimes,
        "wrapper_script": WRAPPER_SCRIPT,
        "systemd_native_template": {
            "status": "not measured",
            "reason": "no systemd as PID 1 on this host; the VM e2e tier (scripts/vm-test) "
            "measures it (see --vm-figures)",
            "expected_added_cost_ms": 0,
        },
    }


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def importtime(argv: list[str], runs: int = 7) -> dict[str, Any]:
    """Top-level imports of one start (``-X importtime``), cumulative us, median of
    ``runs`` starts; plus the total."""
    per_run: list[dict[str, int]] = []
    for _ in range(runs):
        res = subprocess.run(argv, capture_output=True, text=True, env=ENV, check=False)
        top: dict[str, int] = {}
        for line in res.stderr.splitlines():
            m = _IMPORT_LINE.match(line)
            if m and len(m.group(3)) == 1:  # one space: a top-level import
                top[m.group(4)] = top.get(m.group(4), 0) + int(m.group(2))
        per_run.append(top)
    keys = sorted({k for r in per_run for k in r})
    med = {k: sorted(r.get(k, 0) for r in per_run)[runs // 2] for k in keys}
    return {
        "top_level_us": dict(sorted(med.items(), key=lambda kv: -kv[1])),
        "total_us": sum(med.values()),
    }
