"""Print the results of the e2e VM phases that scripts/vm-test read back.

Usage: report.py OUT_DIR PHASE...   (OUT_DIR/phaseN/ as the guest runner wrote it)

Prints every test with its result and duration, the figures the tests
recorded, and for failures the message, the test's output and the journal of
nsd and the test units. Exits 1 if a phase is missing, ran no test, or had a
failure or error. Runs with the host's Debian python3 (stdlib only).
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

JOURNAL_LINES = 80
OUTPUT_CHARS = 4000


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def junit_cases(junit: Path) -> list[tuple[str, str, float, str, str]]:
    """(result, name, seconds, failure text, captured output) per test case."""
    cases = []
    # The file comes from our own VM run, not from an untrusted party.
    for case in ET.parse(junit).iter("testcase"):  # noqa: S314
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        secs = float(case.get("time") or 0)
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            result = "FAIL" if bad.tag == "failure" else "ERROR"
            text = (bad.get("message") or "") + "\n" + (bad.text or "")
            output = "".join((e.text or "") for e in case if e.tag in ("system-out", "system-err"))
            # Drop pytest's empty "--- Captured Log/Out/Err ---" headers.
            output = re.sub(r"(?m)^-+ Captured \w+ -+\n", "", output)
            cases.append((result, name, secs, text, output))
        else:
            result = "SKIP" if case.find("skipped") is not None else "PASS"
            cases.append((result, name, secs, "", ""))
    return cases


def print_diagnostics(d: Path, phase: str, rc: int, any_failure: bool) -> None:
    if rc != 0 and not any_failure:
        log = read(d / "pytest.log")
        print(f"\npytest exited {rc}; the end of its output:\n{log[-OUTPUT_CHARS:]}")
    lines = read(d / "journal-nsd.txt").splitlines()
    if lines:
        print(f"\n--- journal of nsd and the test units, phase {phase} "
              f"(last {JOURNAL_LINES} of {len(lines)} lines)")  # fmt: skip
        print("\n".join(lines[-JOURNAL_LINES:]))
    failed_units = read(d / "failed-units.txt").strip()
    if failed_units:
        print(f"\n--- systemctl --failed, phase {phase}\n{failed_units}")


def phase_report(out: Path, phase: str) -> tuple[int, int, int, bool]:
    """Print one phase; returns (passed, failed, skipped, phase_ok)."""
    d = out / f"phase{phase}"
    print(f"\n=== phase {phase} ===")
    if not (d / "pytest.rc").exists():
        print(f"phase {phase}: NO RESULTS (the VM did not finish this phase)")
        return 0, 0, 0, False
    rc = int(read(d / "pytest.rc").strip() or "1")
    boot = read(d / "boot-time.txt").strip().splitlines()
    if boot:
        print(f"boot: {boot[0]}")
    cases = junit_cases(d / "junit.xml") if (d / "junit.xml").exists() else []
    if not cases:
        print("  (no test results: pytest did not get as far as running tests)")
    for result, name, secs, _, _ in cases:
        print(f"  {result:5} {name}  ({secs:.1f} s)")
    figures = d / "figures.json"
    if figures.exists():
        print(f"figures (phase {phase}):")
        for k, v in sorted(json.loads(figures.read_text()).items()):
            print(f"  {k} = {json.dumps(v)}")
    failures = [(n, text, output) for r, n, _, text, output in cases if r in ("FAIL", "ERROR")]
    for name, text, output in failures:
        print(f"\n--- {name}\n{text.strip()[-OUTPUT_CHARS:]}")
        if output.strip():
            print(f"--- output of {name}\n{output.strip()[-OUTPUT_CHARS:]}")
    passed = sum(1 for c in cases if c[0] == "PASS")
    skipped = sum(1 for c in cases if c[0] == "SKIP")
    ok = rc == 0 and not failures and passed > 0
    if not ok:
        print_diagnostics(d, phase, rc, bool(failures))
    return passed, len(failures), skipped, ok


def main() -> int:
    out = Path(sys.argv[1])
    total_p = total_f = total_s = 0
    all_ok = True
    for phase in sys.argv[2:]:
        p, f, s, ok = phase_report(out, phase)
        total_p, total_f, total_s = total_p + p, total_f + f, total_s + s
        all_ok = all_ok and ok
    print(f"\ne2e: {total_p} passed, {total_f} failed, {total_s} skipped"
          + ("" if all_ok else " (TIER FAILED)"))  # fmt: skip
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
