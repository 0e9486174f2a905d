"""The read caches of the API's fast path never outlive what they cache.

users: positive NSS answers are dropped when /etc/passwd changes and after
CACHE_SECONDS in any case (backends that /etc/passwd says nothing about);
negative answers are never cached. store: every write empties the record cache.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Network
from pathlib import Path

import pytest

from nsd import users
from nsd.core import store
from nsd.model import TenantRecord, TenantState


class FakeNss:
    """pwd.getpwnam/getpwuid over a dict, counting the calls; plus a passwd file
    whose change the cache watches."""

    def __init__(self, passwd: Path) -> None:
        self.passwd = passwd
        self.entries: dict[str, int] = {}
        #: names a backend answers for but does not enumerate (LDAP without enumeration)
        self.ldap: set[str] = set()
        self.calls = 0
        self.write()

    def write(self) -> None:
        # A new file renamed into place, as useradd/userdel/usermod do.
        tmp = self.passwd.with_suffix(".new")
        tmp.write_text(
            "".join(f"{n}:x:{u}:{u}::/home/{n}:/bin/sh\n" for n, u in self.entries.items())
        )
        os.replace(tmp, self.passwd)

    def _pw(self, name: str, uid: int) -> pwd.struct_passwd:
        return pwd.struct_passwd((name, "x", uid, uid, "", f"/home/{name}", "/bin/sh"))

    def getpwnam(self, name: str) -> pwd.struct_passwd:
        self.calls += 1
        if name not in self.entries:
            raise KeyError(name)
        return self._pw(name, self.entries[name])

    def getpwall(self) -> list[pwd.struct_passwd]:
        """Only the users of the files backend: ``ldap`` ones are not enumerated."""
        self.calls += 1
        return [self._pw(n, u) for n, u in self.entries.items() if n not in self.ldap]

    def getpwuid(self, uid: int) -> pwd.struct_passwd:
        self.calls += 1
        for name, u in self.entries.items():
            if u == uid:
                return self._pw(name, uid)
        raise KeyError(uid)


@pytest.fixture
def nss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNss]:
    fake = FakeNss(tmp_path / "passwd")
    monkeypatch.setattr(users, "ACCOUNTS_FILE", str(fake.passwd))
    monkeypatch.setattr("nsd.users.pwd.getpwnam", fake.getpwnam)
    monkeypatch.setattr("nsd.users.pwd.getpwuid", fake.getpwuid)
    monkeypatch.setattr("nsd.users.pwd.getpwall", fake.getpwall)
    users.clear_cache()
    yield fake
    users.clear_cache()


def test_positive_answers_are_reused(nss: FakeNss) -> None:
    nss.entries["alice"] = 2001
    nss.write()
    assert users.by_name("alice") == users.by_name("alice")
    assert users.by_uid(2001) == users.by_uid(2001)
    assert nss.calls == 2


def test_negative_answers_are_not_cached(nss: FakeNss) -> None:
    assert users.by_name("alice") is None
    assert users.by_uid(2001) is None
    # Added without touching the watched file (an LDAP user, say): seen at once.
    nss.entries["alice"] = 2001
    assert users.by_name("alice") is not None
    assert users.by_uid(2001) is not None


def test_deletion_is_noticed_when_passwd_changes(nss: FakeNss) -> None:
    nss.entries["alice"] = 2001
    nss.write()
    assert users.by_name("alice") is not None
    assert users.identity_problem(2001, "alice") is None
    del nss.entries["alice"]
    nss.write()
    assert users.by_name("alice") is None
    problem = users.identity_problem(2001, "alice")
    assert problem is not None and "deleted" in problem


def test_rename_is_noticed_when_passwd_changes(nss: FakeNss) -> None:
    nss.entries["alice"] = 2001
    nss.write()
    assert users.by_uid(2001).name == "alice"  # type: ignore[union-attr]
    nss.entries = {"alicia": 2001}
    nss.write()
    assert users.by_name("alice") is None
    problem = users.identity_problem(2001, "alice")
    assert problem is not None and "alicia" in problem


def test_without_a_passwd_change_the_window_bounds_staleness(
    nss: FakeNss, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("nsd.users.time.monotonic", lambda: clock[0])
    nss.entries["alice"] = 2001
    nss.write()
    assert users.by_name("alice") is not None
    del nss.entries["alice"]  # gone from the backend; /etc/passwd unchanged
    clock[0] += users.CACHE_SECONDS / 2
    assert users.by_name("alice") is not None  # within the documented window
    clock[0] += users.CACHE_SECONDS / 2 + 0.001
    assert users.by_name("alice") is None
    assert users.by_uid(2001) is None


def test_a_missing_passwd_file_disables_the_cache(nss: FakeNss) -> None:
    nss.entries["alice"] = 2001
    nss.passwd.unlink()
    assert users.by_name("alice") is not None
    assert users.by_name("alice") is not None
    assert nss.calls == 2


def _rec(uid: int, state: TenantState = TenantState.CREATING) -> TenantRecord:
    return TenantRecord(
        uid,
        f"u{uid}",
        state,
        f"u{uid}",
        f"nsd{uid}",
        IPv4Address("100.64.0.2"),
        IPv6Network("fd00:1:2:3::/64"),
        False,
        store.now_us(),
    )


def test_store_writes_drop_cached_records(tmp_path: Path) -> None:
    s = store.Store(tmp_path / "nsd.db")
    assert s.get(1001) is None and s.get_by_name("u1001") is None  # cached as absent
    s.insert(_rec(1001))
    got = s.get_by_name("u1001")
    assert got is not None and got.state is TenantState.CREATING
    assert s.get(1001) is got  # served from the cache
    s.set_state(1001, TenantState.READY)
    assert s.get(1001).state is TenantState.READY  # type: ignore[union-attr]
    assert s.get_by_name("u1001").state is TenantState.READY  # type: ignore[union-attr]
    s.delete(1001, quarantine=True)
    assert s.get(1001) is None and s.get_by_name("u1001") is None
    s.close()


def test_a_failed_write_leaves_no_stale_cache(tmp_path: Path) -> None:
    s = store.Store(tmp_path / "nsd.db")
    s.insert(_rec(1001))
    assert s.get(1001) is not None
    assert s.get(1002) is None
    with pytest.raises(store.StoreError):
        s.insert(_rec(1002))  # the same addresses: refused after its tenant row, rolled back
    assert s.get(1002) is None and s.get_by_name("u1002") is None
    s.set_state(1001, TenantState.READY)
    assert s.get(1001).state is TenantState.READY  # type: ignore[union-attr]
    s.close()


def test_address_texts_match_the_addresses() -> None:
    r = _rec(1001)
    assert r.address_texts == (str(r.ipv4_address), str(r.ipv6_address), str(r.ipv6_prefix))


def test_store_all_and_overrides_follow_writes(tmp_path: Path) -> None:
    s = store.Store(tmp_path / "nsd.db")
    assert s.all() == []
    s.insert(_rec(1001))
    assert [r.uid for r in s.all()] == [1001]
    listed = s.all()
    listed.clear()  # the caller's copy: the cache is untouched
    assert [r.uid for r in s.all()] == [1001]
    assert s.all_limit_overrides() == {}
    s.set_limit_overrides(1001, {"memory_max": "1G", "tasks_max": "50"})
    assert s.all_limit_overrides() == {1001: {"memory_max": "1G", "tasks_max": "50"}}
    s.set_state(1001, TenantState.READY)
    assert s.all()[0].state is TenantState.READY
    s.delete(1001, quarantine=False)
    assert s.all() == []
    s.close()


def test_many_identities_are_checked_with_one_enumeration(nss: FakeNss) -> None:
    n = users.ENUMERATE_FROM
    nss.entries = {f"u{i}": 3000 + i for i in range(n)}
    nss.entries["renamed"] = nss.entries.pop("u1")
    nss.entries["fromldap"] = 5000
    nss.ldap = {"fromldap"}
    nss.write()
    recorded = [(3000 + i, f"u{i}") for i in range(n)] + [(5000, "fromldap"), (6000, "gone")]
    problems = users.identity_problems(recorded)
    # one getpwall; getpwuid only for the two UIDs it did not list
    assert nss.calls == 3
    assert [i for i, p in enumerate(problems) if p is not None] == [1, n + 1]
    assert "renamed" in (problems[1] or "")
    assert "deleted" in (problems[n + 1] or "")
    # the same answers as one lookup per UID
    assert problems == [users.identity_problem(uid, name) for uid, name in recorded]


def test_enumeration_takes_the_first_entry_of_a_uid(
    nss: FakeNss, monkeypatch: pytest.MonkeyPatch
) -> None:
    # files first, then another backend with the same UID: getpwuid answers the first
    first, second = nss._pw("alice", 2001), nss._pw("mallory", 2001)
    monkeypatch.setattr("nsd.users.pwd.getpwall", lambda: [first, second])
    recorded = [(2001, "alice")] * users.ENUMERATE_FROM
    assert users.identity_problems(recorded) == [None] * users.ENUMERATE_FROM
