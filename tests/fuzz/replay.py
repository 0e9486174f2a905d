"""Replays corpus directories through a fuzz target without the engine (for coverage.py):
``python -m tests.fuzz.replay tests/fuzz/fuzz_NAME.py DIR...``."""

from __future__ import annotations

import importlib.util
import pathlib
import sys


def main(script: str, directories: list[str]) -> None:
    sys.path.insert(0, str(pathlib.Path(script).parent))  # the targets import fuzzlib
    spec = importlib.util.spec_from_file_location("target", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for directory in directories:
        for path in sorted(pathlib.Path(directory).iterdir()):
            module.test_one_input(path.read_bytes())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
