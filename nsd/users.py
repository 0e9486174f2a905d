"""Unix users through NSS (files, LDAP, sssd: whatever nsswitch.conf says)."""

from __future__ import annotations

import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


def _from_pw(pw: pwd.struct_passwd) -> User:
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell)


def by_name(name: str) -> User | None:
    try:
        return _from_pw(pwd.getpwnam(name))
    except KeyError:
        return None


def by_uid(uid: int) -> User | None:
    try:
        return _from_pw(pwd.getpwuid(uid))
    except KeyError:
        return None


def identity_problem(uid: int, recorded_name: str) -> str | None:
    """Why the user recorded as (uid, name) is no longer the same user, or None.

    The UID is the identity. A different name for the UID means a rename or a
    UID reused by a new account; no user for the UID means it was deleted. nsd
    reports either and does not act on the tenant until an operator decides.
    """
    current = by_uid(uid)
    if current is None:
        return f"user deleted: uid {uid} (recorded as {recorded_name}) no longer exists"
    if current.name != recorded_name:
        return (
            f"uid {uid} was recorded as {recorded_name} and is now {current.name} "
            "(renamed, or the uid was reused)"
        )
    return None
