"""Golden files: whole documents compared with a reviewed copy under tests/fixtures/golden.

A golden file is JSON with one nft command per line, so that ``git diff`` shows a changed
rule as one changed line. When a change to the rules is intended, regenerate the files with
``scripts/update-golden`` (which runs the tests with ``NSD_UPDATE_GOLDEN=1``), read the diff
line by line, and commit it with the change.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
UPDATE = os.environ.get("NSD_UPDATE_GOLDEN") == "1"


def render(doc: dict[str, Any] | None) -> str:
    """``null``, or ``{"nftables": [`` then one command per line."""
    if doc is None:
        return "null\n"
    if list(doc) != ["nftables"]:
        raise ValueError(f"not an nft document: keys {list(doc)}")
    lines = [json.dumps(cmd, sort_keys=True) for cmd in doc["nftables"]]
    return '{"nftables": [\n' + ",\n".join(lines) + "\n]}\n"


def check(name: str, doc: dict[str, Any] | None) -> None:
    """Compare ``doc`` with tests/fixtures/golden/<name>.json (or write it when updating)."""
    path = GOLDEN / f"{name}.json"
    got = render(doc)
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got, encoding="utf-8")
    if not path.exists():
        raise AssertionError(f"{path} is missing; run scripts/update-golden and review it")
    want = path.read_text(encoding="utf-8")
    if got != want:
        diff = "".join(
            difflib.unified_diff(
                want.splitlines(keepends=True), got.splitlines(keepends=True), str(path), "now"
            )
        )
        raise AssertionError(
            f"{name}: the document differs from its golden file (if intended, run "
            f"scripts/update-golden and review the diff):\n{diff}"
        )
