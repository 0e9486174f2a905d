"""Unix users through NSS (files, LDAP, sssd: whatever nsswitch.conf says).

Positive answers are cached briefly: glibc's files backend rereads /etc/passwd on
every call (~70 us with 1,000 users, a quarter of an API ``Get``). The cache is
dropped whenever /etc/passwd changes (useradd, userdel, usermod and vipw all replace
or rewrite it), so with the files backend a rename or deletion is seen at once. For
other backends (LDAP, sssd), where /etc/passwd says nothing, an answer is reused for
at most ``CACHE_SECONDS``. Negative answers are never cached.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: The longest a positive NSS answer is reused (see the module docstring).
CACHE_SECONDS = 2.0
#: Whose change empties the cache at once.
ACCOUNTS_FILE = "/etc/passwd"

_by_name: dict[str, tuple[float, User]] = {}
_by_uid: dict[int, tuple[float, User]] = {}
_passwd_stamp: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


def _from_pw(pw: pwd.struct_passwd) -> User:
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell)


def _fresh_since() -> float:
    """Cached answers from before the returned monotonic time are stale. A changed
    /etc/passwd (one stat: ~1 us, against the reread it saves) empties the cache."""
    global _passwd_stamp  # noqa: PLW0603 -- module-level cache, one per process
    try:
        st = os.stat(ACCOUNTS_FILE)
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    if stamp != _passwd_stamp or stamp is None:
        _passwd_stamp = stamp
        clear_cache()
    return time.monotonic() - CACHE_SECONDS


def clear_cache() -> None:
    _by_name.clear()
    _by_uid.clear()


def by_name(name: str) -> User | None:
    since = _fresh_since()
    hit = _by_name.get(name)
    if hit is not None and hit[0] > since:
        return hit[1]
    try:
        user = _from_pw(pwd.getpwnam(name))
    except KeyError:
        _by_name.pop(name, None)
        return None
    _by_name[name] = (time.monotonic(), user)
    return user


def by_uid(uid: int) -> User | None:
    since = _fresh_since()
    hit = _by_uid.get(uid)
    if hit is not None and hit[0] > since:
        return hit[1]
    try:
        user = _from_pw(pwd.getpwuid(uid))
    except KeyError:
        _by_uid.pop(uid, None)
        return None
    _by_uid[uid] = (time.monotonic(), user)
    return user


def identity_problem(uid: int, recorded_name: str) -> str | None:
    """Why the user recorded as (uid, name) is no longer the same user, or None.

    The UID is the identity. A different name for the UID means a rename or a
    UID reused by a new account; no user for the UID means it was deleted. nsd
    reports either and does not act on the tenant until an operator decides.
    """
    return _problem(uid, recorded_name, by_uid(uid))


#: From this many tenants on, :func:`identity_problems` enumerates the user database
#: once instead of asking for each UID.
ENUMERATE_FROM = 32


def identity_problems(recorded: Sequence[tuple[int, str]]) -> list[str | None]:
    """:func:`identity_problem` for each (uid, name).

    One enumeration (getpwall) answers for every UID it lists: with the files backend
    one read of /etc/passwd, where a lookup per UID rereads it each time (1,000
    tenants: 0.4 s of CPU, at every start). Listed in nsswitch order, the first entry of
    a UID is the one getpwuid returns. UIDs it does not list (an LDAP or sssd backend
    that does not enumerate) are looked up one by one, as before.
    """
    listed: dict[int, User] = {}
    if len(recorded) >= ENUMERATE_FROM:
        for pw in pwd.getpwall():
            listed.setdefault(pw.pw_uid, _from_pw(pw))
    return [_problem(uid, name, listed.get(uid) or by_uid(uid)) for uid, name in recorded]


def _problem(uid: int, recorded_name: str, current: User | None) -> str | None:
    if current is None:
        return f"user deleted: uid {uid} (recorded as {recorded_name}) no longer exists"
    if current.name != recorded_name:
        return (
            f"uid {uid} was recorded as {recorded_name} and is now {current.name} "
            "(renamed, or the uid was reused)"
        )
    return None
