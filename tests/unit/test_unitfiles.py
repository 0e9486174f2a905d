"""nsd/systemd/unitfiles.py: escaping against the real systemd-escape, template discovery with
systemd's masking rules, and applying drop-ins atomically without touching anything else."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsd.systemd import unit_templates as ut
from nsd.systemd import unitfiles as uf

SYSTEMD_ESCAPE = shutil.which("systemd-escape")
needs_systemd_escape = pytest.mark.skipif(
    SYSTEMD_ESCAPE is None, reason="needs systemd-escape (Debian package systemd)"
)

TRICKY = [
    "web-shop", "a.b", ".dotted", "..x", "x.", "_x", "-x", "a$", "foo$", "a b", "a\\b",
    "a/b", "/", "//", "", "a:b", "ä", "日本", "tab\there", "a@b", "%i", "x-y-z-", "\x7f",
]  # fmt: skip
texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))
unit_chars = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:-_.\\")
user_names = st.from_regex(re.compile(r"[a-z_][a-z0-9_.-]{0,30}", re.ASCII), fullmatch=True).filter(
    lambda n: n not in (".", "..")
)


def _systemd_escape(*args: str) -> list[str]:
    """Many strings in one call: escaped text never contains a space."""
    assert SYSTEMD_ESCAPE is not None
    out = subprocess.run(
        [SYSTEMD_ESCAPE, "--", *args], capture_output=True, text=True, check=True
    ).stdout
    return out.rstrip("\n").split(" ")


# -- escaping ----------------------------------------------------------------------


@needs_systemd_escape
def test_escape_matches_systemd_escape_on_tricky_strings() -> None:
    assert [uf.systemd_escape(s) for s in TRICKY] == _systemd_escape(*TRICKY)


@needs_systemd_escape
@settings(max_examples=20, deadline=None)
@given(st.lists(texts, min_size=1, max_size=30))
def test_escape_matches_systemd_escape_on_arbitrary_text(strings: list[str]) -> None:
    assert [uf.systemd_escape(s) for s in strings] == _systemd_escape(*strings)


@needs_systemd_escape
def test_unescape_matches_systemd_escape_unescape() -> None:
    # What %I makes of an instance: the dash of web-shop becomes a slash.
    samples = ["web-shop", "web\\x2dshop", "foo\\x24", "a.b", "\\x2efoo", "-", "\\xc3\\xa4"]
    assert SYSTEMD_ESCAPE is not None
    expected = [
        subprocess.run(
            [SYSTEMD_ESCAPE, "--unescape", "--", s], capture_output=True, text=True, check=True
        ).stdout.rstrip("\n")
        for s in samples
    ]
    assert [uf.systemd_unescape(s) for s in samples] == expected
    assert uf.systemd_unescape("web-shop") == "web/shop"


@given(texts)
def test_unescape_inverts_escape(text: str) -> None:
    escaped = uf.systemd_escape(text)
    assert set(escaped) <= unit_chars
    assert not escaped.startswith(".")
    assert uf.systemd_unescape(escaped) == text


@pytest.mark.parametrize("bad", ["a\\", "a\\y41", "a\\x4", "a\\xzz"])
def test_unescape_refuses_bad_escapes(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid escape"):
        uf.systemd_unescape(bad)


# -- instance and unit names --------------------------------------------------------


@given(user_names)
def test_every_accepted_user_without_dollar_is_its_own_instance(user: str) -> None:
    assert uf.instance_name(user) == user
    assert uf.unit_name("php-fpm@.service", user) == f"php-fpm@{user}.service"


@pytest.mark.parametrize("user", ["web-shop", "a.b", "_x", "a-", "x-y-z"])
def test_dashes_and_dots_stay_as_they_are(user: str) -> None:
    # Escaping would name another unit: php-fpm@web\x2dshop.service, whose %i is
    # "web\x2dshop". The unit an operator starts is php-fpm@web-shop.service.
    assert uf.unit_name("php-fpm@.service", user) == f"php-fpm@{user}.service"


def test_a_user_that_needs_escaping_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"foo\\\\x24.*%i would no longer be the user name"):
        uf.instance_name("foo$")


@pytest.mark.parametrize("user", ["", "Alice", "a/b", "..", "-x", ".x", "a b", "x" * 33])
def test_invalid_user_names_are_refused(user: str) -> None:
    with pytest.raises(ValueError, match="invalid user name"):
        uf.instance_name(user)


@pytest.mark.parametrize("template", ["php-fpm.service", "php-fpm@x.service", "a/b@.service",
                                      "php-fpm@.socket", "@.service"])  # fmt: skip
def test_unit_name_needs_a_service_template(template: str) -> None:
    with pytest.raises(ValueError, match="not a service template"):
        uf.unit_name(template, "alice")


def test_unit_name_length_is_checked() -> None:
    with pytest.raises(ValueError, match="longer than 255"):
        uf.unit_name("p" * 220 + "@.service", "a" * 32)


# -- finding templates ----------------------------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> list[Path]:
    """A unit search path: etc, run, usr (highest priority first)."""
    dirs = [tmp_path / "etc", tmp_path / "run", tmp_path / "usr"]
    for d in dirs:
        d.mkdir()
    return dirs


MARKED = "[Unit]\nDescription=x\nX-NSD-Tenant=yes\n[Service]\nExecStart=/bin/x %i\n"
UNMARKED = "[Unit]\nDescription=x\n[Service]\nExecStart=/bin/x %i\n"


def _names(path: list[Path]) -> list[str]:
    return [t.name for t in ut.find_templates(path)]


def test_finds_marked_templates_only(path: list[Path]) -> None:
    etc, _, usr = path
    (usr / "php-fpm@.service").write_text(MARKED)
    (usr / "other@.service").write_text(UNMARKED)
    (usr / "plain.service").write_text(MARKED)  # not a template
    (usr / "inst@alice.service").write_text(MARKED)  # an instance, not a template
    (etc / "app@.service").write_text(MARKED)
    templates = ut.find_templates(path)
    assert [t.name for t in templates] == ["app@.service", "php-fpm@.service"]
    assert templates[1].path == usr / "php-fpm@.service" == templates[1].marked_in


def test_etc_masks_usr(path: list[Path]) -> None:
    etc, run, usr = path
    (usr / "a@.service").write_text(MARKED)
    (etc / "a@.service").write_text(UNMARKED)  # the operator's copy wins: not marked
    (usr / "b@.service").write_text(UNMARKED)
    (run / "b@.service").write_text(MARKED)  # /run before /usr: marked
    assert _names(path) == ["b@.service"]


def test_masked_by_dev_null_or_an_empty_file(path: list[Path]) -> None:
    etc, run, usr = path
    (usr / "a@.service").write_text(MARKED)
    (etc / "a@.service").symlink_to(os.devnull)
    (usr / "b@.service").write_text(MARKED)
    (run / "b@.service").write_text("")
    (usr / "c@.service").write_text(MARKED)
    assert _names(path) == ["c@.service"]


def test_linked_file_is_followed_and_alias_is_skipped(path: list[Path], tmp_path: Path) -> None:
    etc, _, usr = path
    elsewhere = tmp_path / "opt"
    elsewhere.mkdir()
    (elsewhere / "linked@.service").write_text(MARKED)
    (etc / "linked@.service").symlink_to(elsewhere / "linked@.service")  # systemctl link
    (usr / "real@.service").write_text(MARKED)
    (etc / "alias@.service").symlink_to(usr / "real@.service")  # systemd loads "real@"
    (etc / "dangling@.service").symlink_to(tmp_path / "nowhere@.service")
    templates = ut.find_templates(path)
    assert [t.name for t in templates] == ["linked@.service", "real@.service"]
    assert templates[0].path == elsewhere / "linked@.service"


def test_marker_in_a_dropin_opts_in_and_out(path: list[Path]) -> None:
    etc, run, usr = path
    (usr / "vendor@.service").write_text(UNMARKED)
    (etc / "vendor@.service.d").mkdir()
    (etc / "vendor@.service.d" / "nsd.conf").write_text("[Unit]\nX-NSD-Tenant=yes\n")
    (usr / "optout@.service").write_text(MARKED)
    (run / "optout@.service.d").mkdir()
    (run / "optout@.service.d" / "zz.conf").write_text("[Unit]\nX-NSD-Tenant=no\n")
    templates = ut.find_templates(path)
    assert [t.name for t in templates] == ["vendor@.service"]
    assert templates[0].marked_in == etc / "vendor@.service.d" / "nsd.conf"


def test_dropins_apply_in_name_order_and_etc_masks_same_name(path: list[Path]) -> None:
    etc, _, usr = path
    (usr / "t@.service").write_text(UNMARKED)
    for d in (etc, usr):
        (d / "t@.service.d").mkdir()
    (usr / "t@.service.d" / "10-on.conf").write_text("[Unit]\nX-NSD-Tenant=yes\n")
    (usr / "t@.service.d" / "20-off.conf").write_text("[Unit]\nX-NSD-Tenant=false\n")
    assert _names(path) == []
    # /etc's 20-off.conf replaces /usr's: the last word is yes again.
    (etc / "t@.service.d" / "20-off.conf").write_text("[Unit]\nX-NSD-Tenant=on\n")
    assert _names(path) == ["t@.service"]
    (etc / "t@.service.d" / "30-ignored.txt").write_text("[Unit]\nX-NSD-Tenant=no\n")
    assert _names(path) == ["t@.service"]


@pytest.mark.parametrize(
    ("text", "marked"),
    [
        ("[Unit]\nX-NSD-Tenant=yes\n", True),
        ("[Unit]\nX-NSD-Tenant = TRUE \n", True),
        ("[Unit]\nX-NSD-Tenant=1\n", True),
        ("[Unit]\nX-NSD-Tenant=yes\nX-NSD-Tenant=no\n", False),  # the last one wins
        ("[Unit]\nX-NSD-Tenant=maybe\n", False),
        ("[Unit]\n#X-NSD-Tenant=yes\n", False),
        ("[Unit]\n; X-NSD-Tenant=yes\n", False),
        ("[Service]\nX-NSD-Tenant=yes\n", False),  # only [Unit] counts
        ("[Unit]\nDescription=a \\\n  X-NSD-Tenant=yes\n", False),  # a continued value
        ("[Unit]\nX-NSD-Tenant=\\\nyes\n", True),
        ("[Unit]\nx-nsd-tenant=yes\n", False),  # keys are case-sensitive
    ],
)
def test_marker_parsing(path: list[Path], text: str, marked: bool) -> None:
    (path[2] / "t@.service").write_text(text + "[Service]\nExecStart=/bin/x\n")
    assert _names(path) == (["t@.service"] if marked else [])


def test_missing_directories_are_fine(tmp_path: Path) -> None:
    assert ut.find_templates([tmp_path / "nope", tmp_path / "neither"]) == []


def test_lint_warns_about_percent_capital_i_and_slice() -> None:
    text = (
        "[Unit]\nDescription=app of %I\nRequires=nsd-tenant@%I.service\n"
        "[Service]\nUser=%I\nSlice=x.slice\nNetworkNamespacePath=/run/netns/%i\n"
        "Environment=LITERAL=%%I\n"
    )
    warnings = ut.lint(text)
    assert len(warnings) == 3, warnings
    assert "Requires= uses %I" in warnings[0] and "web/shop" in warnings[0]
    assert "User= uses %I" in warnings[1]
    assert "Slice=" in warnings[2]
    assert ut.lint(MARKED) == []


def test_contrib_templates_are_marked_and_clean() -> None:
    contrib = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
    templates = ut.find_templates([contrib])
    assert [t.name for t in templates] == [
        "php-fpm-exec@.service",
        "php-fpm@.service",
        "tenant-app-exec@.service",
        "tenant-app@.service",
    ]  # nsd-tenant@.service is not a tenant service: it must not be in a tenant slice
    assert all(t.warnings == () for t in templates)


# -- rendering and the desired set -----------------------------------------------------


def test_render_dropin() -> None:
    text = uf.render_dropin("php-fpm@.service", "web-shop", 1001, "tenant-1001.slice")
    lines = text.splitlines()
    assert lines[0] == uf.HEADER
    assert "[Service]" in lines
    assert lines[-1] == "Slice=tenant-1001.slice"
    assert "Tenant web-shop (uid 1001), template php-fpm@.service" in text


@pytest.mark.parametrize(
    ("template", "user", "slice_"),
    [
        ("php-fpm.service", "a", "tenant-1.slice"),
        ("php-fpm@.service", "A", "tenant-1.slice"),
        ("php-fpm@.service", "a", "tenant-1.slice\nExecStartPre=/bin/evil"),
        ("php-fpm@.service", "a", "tenant-1.service"),
    ],
)
def test_render_dropin_refuses_bad_input(template: str, user: str, slice_: str) -> None:
    with pytest.raises(ValueError):
        uf.render_dropin(template, user, 1, slice_)


def test_tenant_ref_derives_the_slice_from_the_uid() -> None:
    assert uf.TenantRef.of("web-shop", 1001) == uf.TenantRef("web-shop", 1001, "tenant-1001.slice")
    assert uf.TenantRef.of("a", 7, "hosting.slice").slice == "hosting-7.slice"


def test_desired_is_every_template_for_every_tenant_and_skips_unnamable_users() -> None:
    tenants = [uf.TenantRef.of("alice", 1001), uf.TenantRef.of("web-shop", 1002),
               uf.TenantRef.of("box$", 1003)]  # fmt: skip
    desired, skipped = uf.desired_dropins(["a@.service", "b@.service"], tenants)
    assert sorted(desired) == [
        "a@alice.service",
        "a@web-shop.service",
        "b@alice.service",
        "b@web-shop.service",
    ]
    assert "Slice=tenant-1002.slice" in desired["b@web-shop.service"]
    assert [s.user for s in skipped] == ["box$"]


# -- applying -----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "etc-systemd-system"
    r.mkdir()
    return r


def _desired(*pairs: tuple[str, str, int]) -> dict[str, str]:
    out: dict[str, str] = {}
    for template, user, uid in pairs:
        out[uf.unit_name(template, user)] = uf.render_dropin(
            template, user, uid, f"tenant-{uid}.slice"
        )
    return out


def test_apply_writes_then_changes_nothing(root: Path) -> None:
    desired = _desired(("php-fpm@.service", "web-shop", 1001))
    changes = uf.apply(desired, root)
    assert changes.written == ("php-fpm@web-shop.service",) and changes.changed
    path = root / "php-fpm@web-shop.service.d" / uf.DROPIN_NAME
    assert path.read_text() == desired["php-fpm@web-shop.service"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(path.parent)) == [uf.DROPIN_NAME]  # no temp file left
    mtime = path.stat().st_mtime_ns
    again = uf.apply(desired, root)
    assert not again.changed and again == uf.Changes()
    assert path.stat().st_mtime_ns == mtime
    assert uf.existing_dropins(root) == desired


def test_apply_rewrites_a_changed_dropin(root: Path) -> None:
    uf.apply(_desired(("a@.service", "alice", 1001)), root)
    desired = _desired(("a@.service", "alice", 2002))  # the user got another UID
    assert uf.apply(desired, root).written == ("a@alice.service",)
    assert "Slice=tenant-2002.slice" in (root / "a@alice.service.d" / uf.DROPIN_NAME).read_text()


def test_apply_removes_stale_dropins_and_the_empty_dirs(root: Path) -> None:
    uf.apply(_desired(("a@.service", "alice", 1), ("a@.service", "bob", 2)), root)
    changes = uf.apply(_desired(("a@.service", "alice", 1)), root)
    assert changes.removed == ("a@bob.service",) and changes.written == ()
    assert not (root / "a@bob.service.d").exists()
    assert (root / "a@alice.service.d" / uf.DROPIN_NAME).exists()


def test_apply_keeps_the_operators_files(root: Path) -> None:
    uf.apply(_desired(("a@.service", "bob", 2)), root)
    own = root / "a@bob.service.d" / "override.conf"
    own.write_text("[Service]\nEnvironment=X=1\n")
    unrelated = root / "b@carol.service.d"
    unrelated.mkdir()
    (unrelated / "10-other.conf").write_text("[Service]\nSlice=custom.slice\n")
    changes = uf.apply({}, root)
    assert changes.removed == ("a@bob.service",)
    assert own.read_text() == "[Service]\nEnvironment=X=1\n"  # the .d dir stays for it
    assert (unrelated / "10-other.conf").exists()


def test_a_same_named_file_without_the_header_is_never_touched(root: Path) -> None:
    d = root / "a@alice.service.d"
    d.mkdir()
    theirs = d / uf.DROPIN_NAME
    theirs.write_text("[Service]\nSlice=mine.slice\n")
    changes = uf.apply(_desired(("a@.service", "alice", 1)), root)
    assert not changes.changed
    assert [p.unit for p in changes.problems] == ["a@alice.service"]
    assert "not nsd's" in changes.problems[0].reason
    assert theirs.read_text() == "[Service]\nSlice=mine.slice\n"
    assert uf.existing_dropins(root) == {}
    assert uf.apply({}, root) == uf.Changes()  # nor removed
    assert theirs.exists()


def test_header_must_be_the_first_line(root: Path) -> None:
    d = root / "a@alice.service.d"
    d.mkdir()
    (d / uf.DROPIN_NAME).write_text("[Service]\n" + uf.HEADER + "\nSlice=x.slice\n")
    assert uf.existing_dropins(root) == {}


def test_links_are_not_followed(root: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared.d"
    shared.mkdir()
    (root / "a@alice.service.d").symlink_to(shared)  # would affect every unit linking it
    d = root / "a@bob.service.d"
    d.mkdir()
    target = tmp_path / "target.conf"
    target.write_text(uf.HEADER + "\n[Service]\nSlice=x.slice\n")
    (d / uf.DROPIN_NAME).symlink_to(target)
    changes = uf.apply(_desired(("a@.service", "alice", 1), ("a@.service", "bob", 2)), root)
    assert sorted(p.unit for p in changes.problems) == ["a@alice.service", "a@bob.service"]
    assert os.listdir(shared) == []
    assert target.read_text().endswith("Slice=x.slice\n")
    assert uf.existing_dropins(root) == {}


def test_prune_users_limits_removal_to_those_users(root: Path) -> None:
    uf.apply(_desired(("a@.service", "alice", 1), ("a@.service", "bob", 2)), root)
    # Adding carol must not remove alice's and bob's (the caller did not list them).
    changes = uf.apply(_desired(("a@.service", "carol", 3)), root, prune_users={"carol"})
    assert changes.written == ("a@carol.service",) and changes.removed == ()
    changes = uf.apply({}, root, prune_users={"bob"})
    assert changes.removed == ("a@bob.service",)
    assert sorted(uf.existing_dropins(root)) == ["a@alice.service", "a@carol.service"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _desired(("a@.service", "alice", 1))
    uf.apply(first, root)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", fail)
    changes = uf.apply(_desired(("a@.service", "alice", 2)), root)
    assert not changes.changed
    assert "No space left" in changes.problems[0].reason
    assert os.listdir(root / "a@alice.service.d") == [uf.DROPIN_NAME]
    assert uf.existing_dropins(root) == first


def test_leftover_temp_files_of_ours_are_cleaned(root: Path) -> None:
    uf.apply(_desired(("a@.service", "alice", 1)), root)
    d = root / "a@alice.service.d"
    ours_empty = d / f".{uf.DROPIN_NAME}.0123456789abcdef.tmp"
    ours_empty.write_text("")
    ours_partial = d / f".{uf.DROPIN_NAME}.fedcba9876543210.tmp"
    ours_partial.write_text(uf.HEADER + "\n[Serv")
    theirs = d / f".{uf.DROPIN_NAME}.aaaaaaaaaaaaaaaa.tmp"
    theirs.write_text("something else\n")
    uf.apply(_desired(("a@.service", "alice", 1)), root)
    assert sorted(os.listdir(d)) == sorted([uf.DROPIN_NAME, theirs.name])


def test_apply_refuses_names_that_are_not_instances(root: Path) -> None:
    changes = uf.apply({"plain.service": "x", "../evil@x.service": "y"}, root)
    assert len(changes.problems) == 2 and not changes.changed
    assert os.listdir(root) == []


def test_sync_is_the_whole_cycle(path: list[Path], root: Path) -> None:
    etc, _, usr = path
    (usr / "php-fpm@.service").write_text(MARKED)
    (etc / "app@.service").write_text(MARKED)
    tenants = [uf.TenantRef.of("alice", 1001), uf.TenantRef.of("web-shop", 1002)]
    changes = uf.sync(tenants, search_path=path, root=root)
    assert len(changes.written) == 4 and changes.removed == ()
    assert uf.sync(tenants, search_path=path, root=root) == uf.Changes()

    # The operator takes the marker out of app@: its drop-ins go, php-fpm's stay.
    (etc / "app@.service").write_text(UNMARKED)
    changes = uf.sync(tenants, search_path=path, root=root)
    assert changes.removed == ("app@alice.service", "app@web-shop.service")

    # web-shop is removed as a tenant; alice is not mentioned, so she is left alone.
    changes = uf.sync([], search_path=path, root=root, prune_users={"web-shop"})
    assert changes.removed == ("php-fpm@web-shop.service",)
    assert sorted(uf.existing_dropins(root)) == ["php-fpm@alice.service"]

    # A user that cannot be an instance is reported, not fatal.
    changes = uf.sync(
        [uf.TenantRef.of("alice", 1001), uf.TenantRef.of("box$", 1003)],
        search_path=path,
        root=root,
    )
    assert [s.user for s in changes.skipped] == ["box$"] and not changes.changed
