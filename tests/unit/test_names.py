"""Derived names are valid and injective, for arbitrary users and UIDs."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsd import names

uids = st.integers(min_value=0, max_value=names.MAX_UID)
user_names = st.from_regex(
    re.compile(r"[a-z_][a-z0-9_.-]{0,30}\$?", re.ASCII), fullmatch=True
).filter(lambda n: n not in (".", ".."))
prefixes = st.from_regex(re.compile(r"[a-z][a-z0-9]{0,4}", re.ASCII), fullmatch=True)
_INVALID_IFNAME = re.compile(r"[/:%\s]")


@given(prefixes, uids)
def test_host_ifname_is_valid_and_round_trips(prefix: str, uid: int) -> None:
    name = names.host_ifname(prefix, uid)
    assert len(name.encode()) <= 15
    assert not _INVALID_IFNAME.search(name)
    assert name not in (".", "..", "all", "default")
    assert names.uid_from_ifname(prefix, name) == uid


@given(prefixes, uids, uids)
def test_host_ifname_is_injective(prefix: str, a: int, b: int) -> None:
    assert (names.host_ifname(prefix, a) == names.host_ifname(prefix, b)) == (a == b)


@given(uids, uids)
def test_slice_name_is_injective_and_dash_safe(a: int, b: int) -> None:
    sa, sb = names.slice_name("tenant.slice", a), names.slice_name("tenant.slice", b)
    assert (sa == sb) == (a == b)
    # exactly one dash: the slice nests directly under tenant.slice
    assert sa.count("-") == 1 and sa.startswith("tenant-") and sa.endswith(".slice")


@given(
    user_names,
    uids,
    user_names,
    uids,
    st.sampled_from(["{user}", "usr_{user}", "{uid}", "t{uid}-{user}"]),
)
def test_netns_name_valid_and_injective(u1: str, i1: int, u2: str, i2: int, template: str) -> None:
    n1, n2 = names.netns_name(template, u1, i1), names.netns_name(template, u2, i2)
    for n in (n1, n2):
        assert "/" not in n and n not in (".", "..") and 0 < len(n) <= 255
    # A user is (name, uid) from NSS: both unique. Names collide only for the same user.
    if "{user}" in template and "{uid}" not in template:
        assert (n1 == n2) == (u1 == u2)
    if "{uid}" in template and "{user}" not in template:
        assert (n1 == n2) == (i1 == i2)


@given(st.text(max_size=40))
def test_check_user_name_never_accepts_path_tricks(name: str) -> None:
    if names.check_user_name(name) is None:
        assert "/" not in name and "\0" not in name and name not in (".", "..")
        assert names.netns_name("{user}", name, 1000) == name


@pytest.mark.parametrize(
    "name", ["nsd01", "nsd", "nsdx1", "other1", "nsd1a", "nsd٣", "nsd99999999999"]
)
def test_foreign_links_are_not_ours(name: str) -> None:
    assert names.uid_from_ifname("nsd", name) is None


@pytest.mark.parametrize("uid", [-1, names.MAX_UID + 1, True])
def test_bad_uids_refused(uid: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        names.host_ifname("nsd", uid)
