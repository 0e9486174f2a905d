"""What each way of starting a tenant service adds to a unit's start (phase 1).

``systemd-run --wait`` of ``/bin/true`` as alice, four ways, interleaved round by
round: a plain unit (``User=`` only: the baseline), nsd's systemd-native template
(``NetworkNamespacePath=`` + ``User=``), through ``nsd-exec`` (root unit, nsd-exec
switches), and ``PAMName=su-l`` (the seed's setup); plus the ensure step of the native
template alone, as nsd-tenant@.service runs it (a root oneshot: ``nsd-ensure alice``,
C) next to what it ran before (``nsctl ensure alice``, Python). The medians go to the figures
(scripts/bench puts them into docs/benchmarks.md); the assertions hold only that
every start succeeded, never a time.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from tests.e2e.guest import NSCTL, NSD_ENSURE, NSD_EXEC, run

pytestmark = pytest.mark.phase1

#: Each start is a systemd-run round trip of ~1 s in the emulated VM, and phase 1 has
#: a fixed time budget (scripts/vm/guest/nsd-e2e-run): 6 variants x 6 rounds ~ 40 s.
ROUNDS = 5
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": (("User=alice",), ("/bin/true",)),
    "native": (("NetworkNamespacePath=/run/netns/alice", "User=alice"), ("/bin/true",)),
    "nsd-exec": ((), (NSD_EXEC, "alice", "--", "/bin/true")),
    "pamname": (("PAMName=su-l", "User=alice"), ("/bin/true",)),
    "ensure": ((), (NSD_ENSURE, "alice")),
    "nsctl-ensure": ((), (NSCTL, "ensure", "alice")),
}


def test_unit_start_cost_per_variant(
    tenants_ready: dict[str, Any], figures: dict[str, Any]
) -> None:
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for r in range(ROUNDS + 1):  # round 0 warms up (page cache, nsctl's .pyc)
        for variant in names[r % len(names) :] + names[: r % len(names)]:
            props, cmd = VARIANTS[variant]
            args = [arg for p in props for arg in ("-p", p)]
            t0 = time.perf_counter()
            run("systemd-run", "--quiet", "--wait", "--collect", *args, *cmd)
            if r:
                samples[variant].append((time.perf_counter() - t0) * 1000)
    medians = {v: round(statistics.median(s), 1) for v, s in samples.items()}
    figures["unit_start_ms"] = {**medians, "rounds": ROUNDS}
    assert all(len(s) == ROUNDS for s in samples.values())
