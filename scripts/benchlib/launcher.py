"""Comparison 1: what starting a workload in a tenant's namespace costs.

Variants, each starting ``/bin/true`` as the tenant inside the tenant's namespace:

* ``nsd-exec`` from a NON-editable ``pip install`` into a temp venv (how operators
  install it): the headline number;
* the same, run as ``python -I -S …/site-packages/nsd/exec.py`` (no ``site``: what a
  trimmed launcher would cost);
* ``nsd-exec`` from the repository's editable ``.venv`` (what developers see: the
  editable install's ``.pth`` finder alone costs ~10 ms per start);
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


PROPOSAL = Path(__file__).resolve().parent / "proposals" / "nsd-exec-imports.patch"


class Install:
    """nsd pip-installed (not editable) into a temp venv from a copy of the checkout,
    optionally with a patch applied to the copy."""

    def __init__(self, venv: Path, how: str) -> None:
        self.venv = venv
        self.how = how
        self.python = str(venv / "bin/python")
        self.site = _site_packages(venv)
        self.console_script = str(venv / "bin/nsd-exec")
        # What a launcher run as `python -IS` looks like: no site (no .pth files, no
        # site-packages scan), no user environment; the package path is explicit, and
        # unlike pip's console script it does not import re (~4 ms).
        self.is_script = str(venv / "bin/nsd-exec-IS")
        Path(self.is_script).write_text(
            f"#!{self.python} -IS\n"
            "import sys\n"
            f"sys.path.append({self.site!r})\n"
            "from nsd.exec import main\n"
            "sys.exit(main())\n"
        )
        os.chmod(self.is_script, 0o755)  # noqa: S103 -- a launcher in a temp venv


def install_noneditable(cleanup: Cleanup, prefix: str, patch: Path | None = None) -> Install | None:
    """Built from a copy so pip's in-tree build never writes build/ into the checkout.
    If pip cannot build (no network for the build backend), the layout a wheel
    produces is made by hand: the package in site-packages and pip's console script.
    With ``patch``: None if the patch does not apply (e.g. it is already merged)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-venv-"))
    cleanup.push(f"remove {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "nsd", src / "nsd", ignore=shutil.ignore_patterns("__pycache__"))
    if patch is not None:
        res = subprocess.run(
            ["git", "apply", "-p1", str(patch)],
            cwd=src,
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            log(f"{patch.name} does not apply to this tree (merged already?): {res.stderr.strip()}")
            return None
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
        script = venv / "bin/nsd-exec"
        # pip's console-script template, as pip would write it
        script.write_text(
            f"#!{venv}/bin/python\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
            "from nsd.exec import main\n"
            "if __name__ == '__main__':\n"
            "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
            "    sys.exit(main())\n"
        )
        script.chmod(0o755)
        how = "package copied into site-packages + pip's console-script template (pip failed)"
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
    "nsd-exec-IS": "nsd-exec, python -IS launcher",
    "nsd-exec-editable": "nsd-exec (editable .venv)",
    "proposed": "proposed imports (pip install)",
    "proposed-IS": "proposed imports, python -IS launcher",
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
    assert current is not None
    proposed = install_noneditable(cleanup, prefix, PROPOSAL)
    netns = f"{RUN_NETNS}/usr_{user}"
    dev_py = sys.executable
    dev_exec = str(Path(dev_py).with_name("nsd-exec"))
    exec_args = ["--socket", socket_path, user, "--", "/bin/true"]
    variants: dict[str, list[str]] = {
        "nsd-exec": [current.console_script, *exec_args],
        "nsd-exec-IS": [current.is_script, *exec_args],
        "nsd-exec-editable": [dev_exec, *exec_args],
    }
    if proposed is not None:
        variants["proposed"] = [proposed.console_script, *exec_args]
        variants["proposed-IS"] = [proposed.is_script, *exec_args]
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
        "python -IS -c pass": [current.python, "-IS", "-c", "pass"],
        "python -c pass (venv)": [current.python, "-c", "pass"],
        "python -c pass (editable .venv)": [dev_py, "-c", "pass"],
        "python -IS, import nsd.exec": import_only(current),
    }
    if proposed is not None:
        anatomy["python -IS, import nsd.exec (proposed)"] = import_only(proposed)
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
    importtimes = {
        "nsd-exec": importtime([current.python, "-X", "importtime", *variants["nsd-exec"]]),
        "nsd-exec-IS": importtime(
            [current.python, "-X", "importtime", "-IS", *variants["nsd-exec-IS"]]
        ),
        "nsd-exec-editable": importtime(
            [dev_py, "-X", "importtime", *variants["nsd-exec-editable"]]
        ),
    }
    if proposed is not None:
        importtimes["proposed"] = importtime(
            [proposed.python, "-X", "importtime", *variants["proposed"]]
        )
        importtimes["proposed-IS"] = importtime(
            [proposed.python, "-X", "importtime", "-IS", *variants["proposed-IS"]]
        )
    return {
        "rounds": rounds,
        "warmup_rounds": warmup,
        "install": current.how,
        "proposal": str(PROPOSAL.relative_to(ROOT)) if proposed is not None else None,
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
