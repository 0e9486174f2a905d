"""nsd's exit statuses: problems an operator must fix are not restart loops.

nsd.service lists 2 (configuration) and 3 (start-up refused) in
RestartPreventExitStatus=; these tests pin the statuses to their causes.
"""

from __future__ import annotations

from pathlib import Path

from tests.harness import Daemon


def test_refused_start_exits_3_with_one_line(host_netns: str, run_dir: str, tmp_path: Path) -> None:
    daemon = Daemon(host_netns, tmp_path, run_dir)
    sock = Path(daemon.socket)
    sock.parent.mkdir(parents=True)
    sock.write_text("not a socket\n")  # e.g. a file left by an admin's mistake
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) == 3, daemon.log_text()
    reasons = [line for line in daemon.log_text().splitlines() if "not a socket" in line]
    assert len(reasons) == 1, daemon.log_text()
    assert "Traceback" not in daemon.log_text()
    assert sock.read_text() == "not a socket\n"  # nothing replaced


def test_configuration_error_exits_2(host_netns: str, run_dir: str, tmp_path: Path) -> None:
    daemon = Daemon(host_netns, tmp_path, run_dir, extra='[limits]\nmemory_max = "lots"\n')
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) == 2, daemon.log_text()
    assert "nsd: configuration error:" in daemon.log_text()
    assert "Traceback" not in daemon.log_text()


def test_unit_prevents_restart_on_2_and_3() -> None:
    unit = Path(__file__).resolve().parents[2] / "contrib/systemd/nsd.service"
    lines = [ln.split("=", 1) for ln in unit.read_text().splitlines() if "=" in ln]
    settings = {k.strip(): v.strip() for k, v in lines if not k.startswith("#")}
    assert settings["RestartPreventExitStatus"].split() == ["2", "3"]
