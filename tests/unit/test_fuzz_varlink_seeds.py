"""The varlink fuzz target's seed corpus, replayed without the engine (fast, every run).

The bounded coverage-guided run is ``scripts/fuzz``; this keeps the target itself
and its properties working whenever the server changes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
SEEDS = sorted((FUZZ / "corpus" / "varlink").iterdir())


@pytest.fixture(scope="module")
def target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_varlink", FUZZ / "fuzz_varlink.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_is_there() -> None:
    assert len(SEEDS) >= 30


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_seed(target: ModuleType, seed: Path) -> None:
    target.test_one_input(seed.read_bytes())
