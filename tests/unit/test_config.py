from __future__ import annotations

from pathlib import Path

import pytest

from nsd import config
from nsd.daemon import server_limits
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
    from nsd import doctor

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


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:9917", ("127.0.0.1", 9917)), ("[::1]:9917", ("::1", 9917)),
     (":9917", ("", 9917)), ("", None), ("  ", None), ("localhost:80", ("localhost", 80))],
)  # fmt: skip
def test_parse_listen(text: str, parsed: tuple[str, int] | None) -> None:
    assert config.parse_listen(text) == parsed


@pytest.mark.parametrize("bad", ["9917", "::1:9917", "[::1]9917", "host:70000", "host:x", "a b:1"])
def test_parse_listen_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        config.parse_listen(bad)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("reserved_connections", 4096, "below max_connections"),
        ("idle_timeout", 0, "must be positive"),
        ("call_timeout", -1, "must be positive"),
        ("max_connections_per_non_tenant", 0, "at least 1"),
        ("max_queued_output_bytes_per_uid", 1 << 30, "between max_message_bytes"),
        ("audit_refusal_rate", 0, "must be positive"),
    ],
)
def test_connection_policy_keys_are_validated(key: str, value: object, reason: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.from_mapping({"daemon": {key: value}}))
    assert e.value.key == f"daemon.{key}" and reason in e.value.reason


def test_connection_policy_defaults_match_the_server() -> None:
    # One set of documented defaults: the daemon's config and the server's Limits agree.
    assert server_limits(config.DaemonConfig()) == Limits()
