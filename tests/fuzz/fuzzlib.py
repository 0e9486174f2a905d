"""What the atheris targets in tests/fuzz share.

A target is a script ``fuzz_NAME.py`` with a ``test_one_input(data: bytes)`` that
raises only on a finding (an exception nsd does not declare, or a broken property),
and ends with ``fuzzlib.main(test_one_input)``. ``scripts/fuzz`` runs every target
for a bounded time on its seed corpus (``tests/fuzz/corpus/NAME/``);
``tests/unit/test_fuzz_seeds.py`` replays the seeds without atheris' engine.

Imports of ``nsd`` inside :func:`instrumented` are instrumented for coverage when the
script runs under atheris; anywhere else (pytest, tests/fuzz/replay.py) they are plain.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

try:
    import atheris
except ImportError:  # replaying seeds needs no engine
    atheris = None


@contextlib.contextmanager
def instrumented(*also: str) -> Iterator[None]:
    """Instrument nsd (and the modules ``also`` names) as imported inside the block."""
    # Only when a target runs as the fuzzing script itself: not under pytest or replay.
    if atheris is not None and os.path.basename(sys.argv[0]).startswith("fuzz_"):
        with atheris.instrument_imports(include=["nsd", *also]):
            yield
    else:
        yield


def main(test_one_input: Callable[[bytes], None]) -> None:
    assert atheris is not None, "pip install atheris (the test extra has it)"
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def provider(data: bytes) -> Any:
    """atheris' FuzzedDataProvider (it works without the engine, so replays use it too)."""
    assert atheris is not None, "pip install atheris (the test extra has it)"
    return atheris.FuzzedDataProvider(data)


# Text a tenant could put into a name the kernel prints: every byte but NUL and "/",
# with the ones that break naive parsers made likely.
_TRICKY = (b"\r", b"\n", b"\x0b", b"\x0c", b"\x1c", b"\x85", b":", b" ", b"\t", b"\\",
           b"0::", b"\xff", b"\xc3\xa9", b"\xe2\x80\xa8", b"(", b")", b"=")  # fmt: skip


def hostile_name(fdp: Any, forbidden: bytes = b"\0/", max_len: int = 24) -> bytes:
    """A name with bytes a parser may trip on; never one of ``forbidden``."""
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        if fdp.ConsumeBool():
            parts.append(fdp.PickValueInList(list(_TRICKY)))
        else:
            parts.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)))
    raw = b"".join(parts)[:max_len]
    return bytes(b for b in raw if b not in forbidden) or b"x"


def assert_config_usable(cfg: Any) -> None:
    """What an accepted configuration must not fail at later (issue 20: "configuration
    OK" for files that then time out at once, overflow SQLite or D-Bus, or give names
    the kernel refuses)."""
    import math

    from nsd import config_check, limits, names

    for key, (low, high) in config_check.BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        assert not (isinstance(value, float) and not math.isfinite(value)), (key, value)
        assert low <= value <= high, (key, value)
    for user in ("a" * 32, "_" * 31 + "$", "a"):
        for uid in (1, names.MAX_UID):
            netns = names.netns_name(cfg.netns.name_template, user, uid)
            assert 0 < len(netns.encode()) <= 255 and "/" not in netns and "\0" not in netns
    assert len(names.slice_name(cfg.systemd.parent_slice, names.MAX_UID)) <= 255
    systemd = limits.to_systemd(cfg.limits)
    quota = systemd.pop("cpu_quota_percent", None)  # a float; inf for no quota
    for value in systemd.values():
        assert value is not None and 0 <= value <= limits.UINT64_MAX, cfg.limits
    assert quota is None or math.isinf(quota) or quota * 10_000 < limits.UINT64_MAX
    assert len(cfg.daemon.socket.encode()) <= 107
    for path in (cfg.daemon.socket, cfg.daemon.state_dir, cfg.netns.run_dir):
        assert path.startswith("/") and "\0" not in path
    for rlimit in cfg.exec.rlimits.values():
        for v in (rlimit.soft, rlimit.hard):
            assert v is None or 0 <= v < 2**63
    config_check.parse_listen(cfg.metrics.listen)
    # Names and addresses handed to netlink and nft: no NUL, IFNAMSIZ in bytes, no zones.
    for ifname in (*cfg.network.uplinks, cfg.netns.tenant_interface):
        assert names.valid_ifname(ifname), ifname
    zoned = [cfg.ipam.ipv6_gateway, cfg.ipam.ipv6_prefix]
    zoned += [str(a) for pair in cfg.network.snat.values() for a in pair if a is not None]
    assert not any("%" in z for z in zoned), zoned


def assert_one_line(message: str) -> None:
    """An error as the operator reads it: one line, of a readable length."""
    assert "\n" not in message and "\r" not in message, repr(message)
    assert len(message) < 2000, len(message)


def check_config_outcome(load: Callable[[], Any]) -> None:
    """``load()`` gives a configuration nothing fails on later, or one ConfigError line."""
    from nsd import config

    try:
        cfg = load()
    except config.ConfigError as e:
        assert_one_line(str(e))
        return
    assert_config_usable(cfg)
