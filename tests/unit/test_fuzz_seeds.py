"""Every fuzz target's committed seed corpus, replayed without the fuzzing engine: the
seeds (the issue's examples among them) are regression tests in the unit tier too.
The bounded fuzzing itself is scripts/fuzz, run by scripts/test."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
# A target with a replay test of its own (test_fuzz_varlink_seeds.py) is replayed there.
TARGETS = sorted(
    p.stem
    for p in FUZZ.glob("fuzz_*.py")
    if not Path(__file__).with_name(f"test_{p.stem}_seeds.py").exists()
)


def test_every_target_has_seeds() -> None:
    assert TARGETS, "no fuzz targets found"
    for name in TARGETS:
        assert any((FUZZ / "corpus" / name.removeprefix("fuzz_")).iterdir()), (
            f"{name} has no seed corpus"
        )


@pytest.mark.parametrize("name", TARGETS)
def test_seed_corpus_replays_clean(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FUZZ))
    module = importlib.import_module(name)
    seeds = sorted((FUZZ / "corpus" / name.removeprefix("fuzz_")).iterdir())
    for seed in seeds:
        module.test_one_input(seed.read_bytes())
    assert len(seeds) >= 3 and name in sys.modules
