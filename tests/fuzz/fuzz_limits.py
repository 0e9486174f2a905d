#!/usr/bin/env python3
"""Limits as SetLimits, `nsctl limits` and [limits] give them: any text for any field is
canonical text systemd and the kernel accept, or an InvalidLimit naming the field and
the rule; canonical text is a fixed point; sets are checked for order without crashing."""

from __future__ import annotations

from typing import Any

import fuzzlib

with fuzzlib.instrumented():
    from nsd import limits as L
    from nsd.errors import InvalidLimit

SEEDS = ["512M", "1.5G", "infinity", "150%", "100", "1\u212a", "\u0661\u0660", "9" * 309,
         "18446744073709551614", "16E", "0.5k", "4194304", " 7 ", "1e3", "0x10", "-1"]  # fmt: skip


def text(fdp: Any) -> str | int:
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 0:
        return str(fdp.PickValueInList(SEEDS))
    if choice == 1:
        return int(fdp.ConsumeIntInRange(-(2**80), 2**80))
    if choice == 2:  # digits, a dot, unit letters and look-alikes, spliced
        alphabet = "0123456789.%KMGTEkmgte \t\u212a\u0661\uff11infty"
        n = fdp.ConsumeIntInRange(0, 30)
        return "".join(alphabet[fdp.ConsumeIntInRange(0, len(alphabet) - 1)] for _ in range(n))
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80)))


def test_one_input(data: bytes) -> None:
    fdp = fuzzlib.provider(data)
    values = {}
    for _ in range(fdp.ConsumeIntInRange(1, 5)):
        field = fdp.PickValueInList([*L.FIELDS, "bogus"])
        raw = text(fdp)
        try:
            canon = L.canonical(field, raw)
        except InvalidLimit as e:
            assert e.parameters["field"] == field and e.parameters["reason"], e.parameters
            assert len(e.parameters["value"]) <= 43
            continue
        assert canon.isascii() and L.canonical(field, canon) == canon, (field, raw, canon)
        values[field] = canon
    parsed = L.from_mapping(values)
    for name, value in L.to_systemd(parsed).items():
        if name != "cpu_quota_percent":  # a float, inf for no quota
            assert value is not None and 0 <= value <= L.UINT64_MAX, (name, value)
    if parsed.tasks_max not in (None, L.INFINITY):
        assert int(parsed.tasks_max) <= L.MAX_TASKS
    try:
        L.check_consistent(parsed)
    except InvalidLimit as e:
        assert e.parameters["field"] in L.FIELDS


if __name__ == "__main__":
    fuzzlib.main(test_one_input)
