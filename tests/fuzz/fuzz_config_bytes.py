#!/usr/bin/env python3
"""Configuration from raw file bytes: any byte string either loads into a configuration
nothing fails on later, or is refused with one ConfigError line (FILE: KEY: reason)."""

from __future__ import annotations

import fuzzlib

# tomllib too: its coverage guides the engine from random bytes towards TOML.
with fuzzlib.instrumented("tomllib"):
    from nsd import config


def test_one_input(data: bytes) -> None:
    fuzzlib.check_config_outcome(lambda: config.from_bytes(data, "fuzz.toml"))


if __name__ == "__main__":
    fuzzlib.main(test_one_input)
