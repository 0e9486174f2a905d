#!/usr/bin/env python3
"""Configuration from a TOML-shaped mapping (what tomllib hands to config.from_mapping):
known sections and keys, mostly, with values of every TOML type at their edges - huge
and negative integers, nan and inf, strings with braces, NULs, non-ASCII digits."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import fuzzlib

with fuzzlib.instrumented():
    from nsd import config, limits, network_config
SECTIONS: dict[str, list[str]] = {
    f.name: [k.name for k in fields(getattr(config.Config(), f.name))]
    for f in fields(config.Config)
    if f.name not in ("source", "network")
}
SECTIONS["network"] = list(network_config._KNOWN)
SECTIONS["limits"] = list(limits.FIELDS)
SPECIAL_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e308, 5e-324, 0.05]
SPECIAL_INTS = [0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**400, -(10**20), 65535, 1280]
SPECIAL_STRINGS = [
    "", "{user}", "{uid}", "{user}}", "{{user}}", "{user!r}", "{uid:>300}", "{user.x}",
    "\0", "\u212a", "1\u212a", "\u0661\u0660", "infinity", "Infinity", "150%", "1.5G",
    "9" * 309, "/run/x", "a/b", ".", "..", "tenant.slice", "-.slice", "127.0.0.1:99",
    "[::1]:0", ":\u0669", "eth0", "lo", "0022", "auto", "never", "pool", "uid",
    "100.64.0.0/16", "fe80::1", "fd00::/48", "nsdadmin", "root", "\r\n", "x" * 300,
]  # fmt: skip


def value(fdp: Any, depth: int = 0) -> Any:  # noqa: PLR0911 - one return per TOML type
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 3 else 6)
    if kind == 0:
        return fdp.ConsumeBool()
    if kind == 1:
        return fdp.PickValueInList(SPECIAL_INTS)
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**70), 2**70)
    if kind == 3:
        return fdp.PickValueInList(SPECIAL_FLOATS)
    if kind == 4:
        return fdp.ConsumeFloat()
    if kind == 5:
        return fdp.PickValueInList(SPECIAL_STRINGS)
    if kind == 6:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind in (7, 8):
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return table(fdp, [], depth + 1)


def key(fdp: Any, known: list[str]) -> str:
    if known and fdp.ConsumeProbability() < 0.9:
        return str(fdp.PickValueInList(known))
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12)))


def table(fdp: Any, known: list[str], depth: int) -> dict[str, Any]:
    return {key(fdp, known): value(fdp, depth) for _ in range(fdp.ConsumeIntInRange(0, 4))}


def test_one_input(data: bytes) -> None:
    fdp = fuzzlib.provider(data)
    mapping: dict[str, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        section = key(fdp, list(SECTIONS))
        mapping[section] = (
            table(fdp, SECTIONS.get(section, []), 1) if fdp.ConsumeProbability() < 0.95
            else value(fdp, 1)
        )  # fmt: skip
    fuzzlib.check_config_outcome(lambda: config.from_mapping(mapping, "fuzz.toml"))


if __name__ == "__main__":
    fuzzlib.main(test_one_input)
