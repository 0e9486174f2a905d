"""Issue 20 end to end: the examples against a real daemon. Bad limits through SetLimits
and `nsctl limits` get InvalidLimit naming the field and the rule (not InternalError);
a bad configuration at SIGHUP is refused in one log line and the running one is kept."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.harness import Daemon, TestUsers

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth and mounts"),
]

T = "io.nsd.Tenant."
KELVIN = "1\u212a"


def wait_for_lines(d: Daemon, text: str, count: int, timeout: float = 30.0) -> list[str]:
    """The log's lines holding ``text``, once there are ``count`` of them: the daemon
    logs when it has handled a SIGHUP, so this awaits that event (polling its log)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in d.log_text().splitlines() if text in line]
        if len(lines) >= count or time.monotonic() > deadline:
            assert len(lines) == count, (text, count, d.log_text()[-3000:])
            return lines
        time.sleep(0.05)


def with_key(base: bytes, section: str, line: bytes) -> bytes:
    """The daemon's configuration with ``line`` in ``[section]`` (added if missing)."""
    header = b"[" + section.encode() + b"]\n"
    if header in base:
        return base.replace(header, header + line + b"\n", 1)
    return base + header + line + b"\n"


def test_set_limits_and_nsctl_name_the_field_and_rule(
    running_daemon: tuple[Daemon, TestUsers],
) -> None:
    from nsd.varlink.client import VarlinkError

    d, users = running_daemon
    name = users.add()
    d.call(T + "Create", name=name)
    cases = [
        ("memoryMax", KELVIN, "U+212A"),
        ("memoryMax", "9" * 309, "longer than 64"),
        ("tasksMax", "9" * 20, "1 to 4194304"),
        ("cpuWeight", "\u0661\u0660", "U+0661"),
        ("cpuQuota", "99999999%", "1% to 1000000%"),
    ]
    for field, value, rule in cases:
        with pytest.raises(VarlinkError) as info:
            d.call(T + "SetLimits", name=name, limits={field: value})
        assert info.value.name == T + "InvalidLimit", info.value
        assert info.value.parameters["field"] == field
        assert rule in info.value.parameters["reason"]
    res = d.nsctl("limits", name, "--memory-max", KELVIN, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "invalid memoryMax" in res.stderr and "U+212A" in res.stderr, res.stderr
    res = d.nsctl("limits", name, "--tasks-max", "9" * 20, check=False)
    assert res.returncode == 1 and "1 to 4194304" in res.stderr, res.stderr
    log = d.log_text()
    assert "InternalError" not in log and "Traceback" not in log
    d.call(T + "Remove", name=name)


def test_bad_configuration_at_sighup_is_refused_and_the_old_one_kept(
    running_daemon: tuple[Daemon, TestUsers],
) -> None:
    d, users = running_daemon
    assert d.proc is not None
    name = users.add()
    d.call(T + "Create", name=name)
    base = d.config.read_bytes()
    d.config.write_bytes(with_key(base, "limits", b"tasks_max = 100"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for_lines(d, "reloaded ", 1)
    assert d.call(T + "GetLimits", name=name)["limits"] == {"tasksMax": "100"}
    bad = [
        ("daemon", b'log_level = "info\xff"', "-: not UTF-8"),
        ("netns", b'name_template = "{user}}"', "netns.name_template: not a valid template"),
        ("daemon", b'admin_group = "\\u0000"', "daemon.admin_group: must not contain a NUL"),
        ("tenants", b"lock_timeout = " + b"9" * 400, "tenants.lock_timeout: must be between"),
        ("systemd", b"call_timeout = nan", "systemd.call_timeout: must be between"),
        ("limits", b'memory_max = "1\xe2\x84\xaa"', "limits.memory_max: only ASCII"),
        ("limits", b'tasks_max = "99999999999999999999"', "limits.tasks_max: a number"),
    ]
    for i, (section, line, reason) in enumerate(bad, start=1):
        d.config.write_bytes(with_key(base, section, line))
        d.proc.send_signal(signal.SIGHUP)
        refused = wait_for_lines(d, "reload refused", i)
        assert f"{d.config}: {reason}" in refused[-1], refused[-1]
    log = d.log_text()
    assert "Traceback" not in log and "Task exception" not in log
    assert len([line for line in log.splitlines() if "reloaded " in line]) == 1
    assert d.call(T + "GetLimits", name=name)["limits"] == {"tasksMax": "100"}
    d.call(T + "Remove", name=name)
