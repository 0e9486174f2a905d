"""contrib/prometheus: the rules pass `promtool check rules`, their unit tests pass
`promtool test rules`, every alert is tested both firing and silent, and every
metric they read is one nsd exports (tests/unit/test_metrics.py checks the names
against the exposition; this checks the rules against the catalogue)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from nsd import metrics as M
from tests.promtool import promtool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "nsd-rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "nsd-rules.test.yml"
ALERTS = {
    "TenantOOMKilled", "TenantMemoryNearLimit", "TenantPidsNearLimit", "TenantFaultsRising",
    "NsdDown", "NsdSamplerStale", "NsdReconcileProblems",
}  # fmt: skip


def tool() -> str:
    found = promtool()
    if found is None:
        pytest.skip("promtool unavailable: scripts/promtool could not fetch Debian's prometheus")
    return found


def run(*args: str) -> str:
    done = subprocess.run([tool(), *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def test_promtool_check_rules() -> None:
    out = run("check", "rules", str(RULES))
    assert "SUCCESS: 10 rules found" in out, out


def test_promtool_test_rules() -> None:
    out = run("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in out and "FAILED" not in out, out


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M))
    assert alerts == ALERTS
    tests = RULE_TESTS.read_text()
    for name in ALERTS:
        cases = re.findall(rf"alertname: {name}\n\s*exp_alerts:( \[\])?", tests)
        assert "" in cases, f"{name} never expected to fire"
        assert " []" in cases, f"{name} never expected to stay silent"


def test_every_alert_names_the_tenant_and_what_to_do() -> None:
    blocks = re.split(r"^\s*- alert: ", RULES.read_text(), flags=re.M)[1:]
    for block in blocks:
        name = block.split("\n", 1)[0]
        assert "summary:" in block and "description:" in block, name
        if name.startswith("Tenant"):
            assert block.count("{{ $labels.tenant }}") >= 2, name
        assert re.search(r"`(nsctl|systemctl|journalctl) ", block), f"{name}: no command to run"


def test_rules_read_only_metrics_nsd_exports() -> None:
    used = set(re.findall(r"\b(nsd_[a-z_]+)\b", RULES.read_text()))
    used -= {"nsd_sampler_errors_total"}  # named in a description only
    known = {d.name for d in M.CATALOGUE}
    assert used <= known, used - known
