from __future__ import annotations

from pathlib import Path

import pytest

from nsd import config, config_check
from nsd.startup import server_limits
from nsd.varlink.server import Limits


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "nsd.toml"
    p.write_text(text)
    return p


def test_defaults_need_no_file(tmp_path: Path) -> None:
    cfg = config.from_mapping({}, "none")
    assert cfg.daemon.socket == "/run/nsd/io.nsd.Tenant"
    assert cfg.daemon.database == Path("/var/lib/nsd/nsd.db")
    assert str(cfg.ipam.ipv4_gateway_address) == "100.64.0.1"
    assert cfg.netns.sysctls == {"net.ipv4.ip_unprivileged_port_start": "0"}


def test_full_file(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            """
[daemon]
socket = "/tmp/x.sock"
state_dir = "/tmp/state"
[tenants]
uid_min = 2000
enter_creates = false
[netns]
name_template = "usr_{user}"
[netns.sysctls]
"net.ipv4.ping_group_range" = "0 2147483647"
[ipam]
ipv4_pool = "100.100.0.0/20"
ipv6_prefix = "fd00:1:2::/48"
[exec]
umask = "0027"
[exec.rlimits]
nofile = [1024, 65536]
core = "infinity"
""",
        )
    )
    assert cfg.tenants.uid_min == 2000 and cfg.tenants.enter_creates is False
    assert cfg.netns.sysctls == {"net.ipv4.ping_group_range": "0 2147483647"}
    assert cfg.exec.umask == 0o027
    assert cfg.exec.rlimits["nofile"] == config.ResourceLimit(1024, 65536)
    assert cfg.exec.rlimits["core"] == config.ResourceLimit(None, None)
    assert str(cfg.ipam.ipv4_gateway_address) == "100.100.0.1"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[daemon]\nsockt = '/x'", "daemon.sockt", "unknown key"),
        ("[nope]\na = 1", "nope", "unknown section"),
        ("[tenants]\nuid_min = 'x'", "tenants.uid_min", "must be an integer"),
        ("[tenants]\nenter_creates = 1", "tenants.enter_creates", "true or false"),
        ("[tenants]\nuid_min = 0", "tenants.uid_max", "root is never a tenant"),
        ("[netns]\nname_template = 'fixed'", "netns.name_template", "{user} or {uid}"),
        ("[netns]\nname_template = 'a/{user}'", "netns.name_template", "plain file name"),
        ("[netns]\nlink_prefix = 'toolong'", "netns.link_prefix", "15-byte"),
        ("[netns.sysctls]\n'kernel.panic' = '1'", "netns.sysctls.kernel.panic", "per-namespace"),
        ("[ipam]\nipv4_pool = '10.0.0.0/33'", "ipam.ipv4_pool", "not an IPv4 network"),
        ("[ipam]\nipv4_gateway = '10.9.9.9'", "ipam.ipv4_gateway", "inside"),
        ("[ipam]\nipv6_gateway = 'fd00::1'", "ipam.ipv6_gateway", "link-local"),
        ("[exec]\numask = 22", "exec.umask", "octal"),
        ("[exec.rlimits]\nnofile = [10, 5]", "exec.rlimits.nofile", "exceeds"),
        ("[exec.rlimits]\nbogus = 1", "exec.rlimits.bogus", "unknown limit"),
        ("[daemon\n", "-", "not valid TOML"),
    ],
)
def test_bad_values_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert info.value.source == str(path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(path) in str(info.value) and key in str(info.value)


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nsd import daemon

    good = write(tmp_path, "[tenants]\nuid_min = 5000\n")
    assert daemon.main(["--config", str(good), "--check-config"]) == 0
    assert "configuration OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants]\nuid_mni = 5000\n")
    assert daemon.main(["--config", str(bad), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: tenants.uid_mni: unknown key" in err


def test_limit_checks_report_what_is_not_in_effect(tmp_path: Path) -> None:
    from nsd.core import doctor

    block = tmp_path / "block" / "vda" / "queue"
    block.mkdir(parents=True)
    (block / "scheduler").write_text("[mq-deadline] none\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cgroup.controllers").write_text("cpu io memory pids\n")
    used = [{"memory_max", "io_weight"}]
    checks = {c.name: c for c in doctor.limit_checks(
        None, 257, True, "tenant.slice", used, block_root=str(tmp_path / "block"),
        cgroup_root=str(cg))}  # fmt: skip
    assert checks["slices"].severity == "ok" and "PIDFDs" in checks["slices"].message
    assert checks["io-weight"].severity == "warning"
    (block / "scheduler").write_text("mq-deadline [bfq] none\n")
    names = [c.name for c in doctor.limit_checks(
        None, 257, True, "tenant.slice", used, block_root=str(tmp_path / "block"),
        cgroup_root=str(cg))]  # fmt: skip
    assert "io-weight" not in names
    (cg / "cgroup.controllers").write_text("cpu pids\n")
    names = [c.name for c in doctor.limit_checks(
        None, 257, True, "tenant.slice", used, block_root=str(tmp_path / "block"),
        cgroup_root=str(cg))]  # fmt: skip
    assert "memory-limits" in names
    off = doctor.limit_checks("systemd is not PID 1", None, None, "tenant.slice", used)
    assert off[0].severity == "warning" and "not in effect" in off[0].message


# Issue 20: every example from the fuzzing report gets the documented one-line error
# (FILE: KEY: reason, exit 2) instead of a traceback or a configuration that fails later.
NINES = "9" * 400


@pytest.mark.parametrize(
    ("raw", "key", "reason"),
    [
        (b'[daemon]\nlog_level = "info\xff"\n', "-", "not UTF-8: byte 0xff at offset 26 (line 2)"),
        (b'[netns]\nname_template = "{user}}"\n', "netns.name_template", "Single '}'"),
        (b'[netns]\nname_template = "{user"\n', "netns.name_template", "not a valid template"),
        (b'[netns]\nname_template = "{uid:>300}"\n', "netns.name_template", "no format spec"),
        (b'[netns]\nname_template = "{user!r}"\n', "netns.name_template", "no format spec"),
        (b'[netns]\nname_template = "{user.upper}"\n', "netns.name_template", "unknown field"),
        (b'[netns]\nname_template = "{{user}}"\n', "netns.name_template", "must contain"),
        (b'[netns]\nname_template = "a\\tb{uid}"\n', "netns.name_template", "control"),
        (b'[netns]\nname_template = "' + b"x" * 230 + b'{user}"\n', "netns.name_template",
         "up to 262 bytes"),
        (b'[daemon]\nadmin_group = "\\u0000"\n', "daemon.admin_group", "NUL"),
        (b'[daemon]\nadmin_group = "a\\nb"\n', "daemon.admin_group", "not a group name"),
        (f"[tenants]\nlock_timeout = {NINES}\n".encode(), "tenants.lock_timeout",
         "between 0.1 and 3600, not 9999"),
        (b"[systemd]\ncall_timeout = nan\n", "systemd.call_timeout", "not nan"),
        (b"[tenants]\nstop_timeout = inf\n", "tenants.stop_timeout", "not inf"),
        (b"[daemon]\nshutdown_timeout = -inf\n", "daemon.shutdown_timeout", "not -inf"),
        (b"[metrics]\ninterval = nan\n", "metrics.interval", "not nan"),
        (b"[ipam]\nquarantine_seconds = 9223372036854775807\n", "ipam.quarantine_seconds",
         "between 0 and 316224000"),
        (b"[ipam]\nuid_offset = -1\n", "ipam.uid_offset", "between 0 and"),
        (b"[daemon]\nmax_connections = 99999999999999999999\n", "daemon.max_connections",
         "between 1 and 65536"),
        (b"[exec.rlimits]\nnofile = 9223372036854775808\n", "exec.rlimits.nofile",
         "from 0 to 9223372036854775807"),
        (b'[daemon]\nsocket = "/run/' + b"s" * 120 + b'"\n', "daemon.socket", "at most 107 bytes"),
        (b'[daemon]\nstate_dir = "/var/\\u0000"\n', "daemon.state_dir", "NUL"),
        (b'[systemd]\nparent_slice = "' + b"a" * 240 + b'.slice"\n', "systemd.parent_slice",
         "too long"),
        (b'[metrics]\nlisten = "127.0.0.1:\xd9\xa9\xd9\xa9"\n', "metrics.listen", "invalid port"),
        (b'[metrics]\nlisten = "a\\tb:99"\n', "metrics.listen", "invalid host"),
        (b"[network.bandwidth]\negress_mbit = " + NINES.encode() + b"\n",
         "network.bandwidth.egress_mbit", "above"),
        (b"[network.bandwidth]\negress_mbit = nan\n", "network.bandwidth.egress_mbit", "nan"),
        (b'[limits]\nmemory_max = "1\xe2\x84\xaa"\n', "limits.memory_max", "U+212A"),
        (b'[limits]\nmemory_max = "' + b"9" * 309 + b'"\n', "limits.memory_max", "longer than"),
        (b'[limits]\nmemory_max = "99999999999999999999G"\n', "limits.memory_max", "too large"),
        (b'[limits]\ntasks_max = "99999999999999999999"\n', "limits.tasks_max", "1 to 4194304"),
        (b"[limits]\ntasks_max = 99999999999999999999\n", "limits.tasks_max", "1 to 4194304"),
        (b'[limits]\ncpu_quota = "99999999999%"\n', "limits.cpu_quota", "1% to 1000000%"),
        (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "-", "nested too deeply"),
        # Beyond the issue's list: found while stating what "cannot fail later" means.
        (b'["a\\nb"]\n', "a\nb", "unknown section"),  # shown as a\\nb: one line
        (b'[ipam]\nipv6_gateway = "fe80::1%eth0"\n', "ipam.ipv6_gateway", "zone"),
        (b'[ipam]\nipv6_prefix = "fd00::%1/48"\n', "ipam.ipv6_prefix", "zone"),
        (b'[network]\nuplinks = ["a\\u0000b"]\n', "network.uplinks", "not a usable"),
        (b'[network]\nuplinks = ["' + "\u00e9".encode() * 8 + b'"]\n', "network.uplinks",
         "not a usable"),  # 8 characters, 16 bytes
        (b'[network.snat]\nalice = "fe80::1%eth0"\n', "network.snat.alice", "not an IP"),
    ],
)  # fmt: skip
def test_issue20_examples_are_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes, key: str, reason: str
) -> None:
    from nsd import daemon

    path = tmp_path / "nsd.toml"
    path.write_bytes(raw)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert (info.value.key, info.value.source) == (key, str(path))
    assert reason in info.value.reason
    assert daemon.main(["--config", str(path), "--check-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"nsd: configuration error: {info.value}\n"
    assert str(info.value).startswith(f"{path}: {key.encode('unicode_escape').decode()}: ")
    assert "\n" not in str(info.value) and len(captured.err) < 400
    # Start refuses it the same way, before anything else (the root check comes later).
    assert daemon.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == captured.err


def test_templates_that_work_for_every_user_are_kept() -> None:
    for template in ("{user}", "usr_{user}", "{uid}", "t{uid}-{user}", "{{x}}{uid}", "é{user}"):
        cfg = config.from_mapping({"netns": {"name_template": template}})
        assert cfg.netns.name_template == template
    # The longest literal that still fits NAME_MAX with a 32-character user name.
    longest = "x" * (255 - 32) + "{user}"
    assert config.from_mapping({"netns": {"name_template": longest}}).netns.name_template


def test_numbers_at_their_bounds_are_accepted() -> None:
    for key, (low, high) in config_check.BOUNDS.items():
        section, name = key.split(".")
        if key in (
            "tenants.uid_min",
            "tenants.uid_max",
            "netns.mtu",
            "ipam.uid_offset",
            "faults.keep_days",
            "daemon.reserved_connections",
            "daemon.max_connections",
            "daemon.max_message_bytes",
            "daemon.max_queued_output_bytes",
            "daemon.max_queued_output_bytes_per_uid",
        ):
            continue  # cross-field rules narrow these; covered by their own tests
        for value in (low, high):
            cfg = config.from_mapping({section: {name: value}})
            assert getattr(getattr(cfg, section), name) == value


def test_every_number_has_bounds() -> None:
    """A numeric key without an entry in BOUNDS would raise KeyError, not ConfigError."""
    from dataclasses import fields

    numeric = {
        f"{section.name}.{f.name}"
        for section in fields(config.Config)
        if section.name in config._SECTIONS
        for f in fields(config._SECTIONS[section.name])
        if f.type in ("int", "float") and f"{section.name}.{f.name}" not in config._SPECIAL
    }
    assert numeric and numeric == set(config_check.BOUNDS)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:9917", ("127.0.0.1", 9917)), ("[::1]:9917", ("::1", 9917)),
     (":9917", ("", 9917)), ("", None), ("  ", None), ("localhost:80", ("localhost", 80))],
)  # fmt: skip
def test_parse_listen(text: str, parsed: tuple[str, int] | None) -> None:
    assert config_check.parse_listen(text) == parsed


@pytest.mark.parametrize("bad", ["9917", "::1:9917", "[::1]9917", "host:70000", "host:x", "a b:1"])
def test_parse_listen_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        config_check.parse_listen(bad)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("reserved_connections", 4096, "below max_connections"),
        # Numbers out of config_check.BOUNDS are refused as such (issue 20's one pass).
        ("idle_timeout", 0, "between 0.1 and 3600"),
        ("call_timeout", -1, "between 0.1 and 3600"),
        ("max_connections_per_non_tenant", 0, "between 1 and 65536"),
        ("max_queued_output_bytes_per_uid", 1 << 30, "between max_message_bytes"),
        ("audit_refusal_rate", 0, "between 0.001 and 1000000"),
    ],
)
def test_connection_policy_keys_are_validated(key: str, value: object, reason: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config_check.validate(config.from_mapping({"daemon": {key: value}}))
    assert e.value.key == f"daemon.{key}" and reason in e.value.reason


def test_connection_policy_defaults_match_the_server() -> None:
    # One set of documented defaults: the daemon's config and the server's Limits agree.
    assert server_limits(config.DaemonConfig()) == Limits()
