"""pam_nsd: a PAM session module that puts a tenant's login into its nsd namespace.

Loaded by Debian's ``libpam-python`` (``pam_python.so``), which runs it in the
system's python3 inside the process that opens the PAM session: sshd's
privileged ``sshd-session [priv]`` process, cron's per-job child, su/runuser.
When a session opens for a tenant, the module calls ``io.nsd.Tenant.Enter`` on
nsd's varlink socket, receives the tenant's network namespace as a descriptor
(SCM_RIGHTS) and joins it with ``setns(CLONE_NEWNET)`` in that very process,
before the session's shell or job is forked: everything the session starts
inherits the namespace. Nothing is forked, nothing stays resident, and every
descriptor the module opens is closed before it returns (all are CLOEXEC too).

The PAM line (see docs/logins.md for where it goes in each stack)::

    session required pam_python.so /usr/lib/nsd/pam_nsd.py [ARGUMENTS]

Arguments:

``socket=PATH``
    nsd's varlink socket (default /run/nsd/io.nsd.Tenant).
``unreachable=skip|deny``
    nsd cannot be reached or cannot give the namespace (stopped, timed out,
    failed): ``skip`` lets the login continue in the host namespace (default;
    admin access stays available), ``deny`` fails the session.
``nontenant=skip|deny``
    the user is not a tenant of nsd (no such tenant, UID outside nsd's range):
    ``skip`` (default) or ``deny``.
``uid_min=N``
    users with a smaller UID are never sent to nsd and always skipped, whatever
    ``unreachable`` says (default 1000): root and system accounts can always log
    in, even with ``unreachable=deny`` and nsd down. Keep it at nsd's
    ``tenants.uid_min``.
``create=auto|yes|no``
    create a missing tenant (``auto``: nsd's ``tenants.enter_creates``).
``scope=auto|always|never``
    whether nsd moves the session's process into a scope in the tenant's slice.
    ``auto`` never moves a logind session (``session-N.scope``: an emptied
    session scope ends the session) or a user manager, moves the process a
    service forked to run a login or job (cron's job child, sshd without
    pam_systemd) - it would otherwise count against that service - and
    leaves everything else to nsd's ``systemd.enter_scope``.
``timeout=SECONDS``
    how long the whole exchange with nsd may take (default 5; logins wait).
``debug``
    also log skips of non-tenants (every join is logged at info).

Messages go to syslog (the journal) with the identifier ``pam_nsd``, facility
authpriv. The module uses the standard library only: it runs in the system
python3 that libpam-python links, not in nsd's virtualenv.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import pwd
import socket
import sys
import time
from typing import Any

DEFAULT_SOCKET = "/run/nsd/io.nsd.Tenant"
DEFAULT_TIMEOUT = 5.0
DEFAULT_UID_MIN = 1000
IDENT = "pam_nsd"
ENTER = "io.nsd.Tenant.Enter"
MAX_REPLY = 1 << 20
MAX_FDS = 8
CLONE_NEWNET = 0x40000000
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
# Enter's errors that mean "this user is not (and will not become) a tenant".
NONTENANT_ERRORS = frozenset(
    "io.nsd.Tenant." + e
    for e in ("NoSuchTenant", "NoSuchUser", "UidOutOfRange", "InvalidTenantName")
)
_LOG_AUTHPRIV = 10 << 3
_SEVERITY = {"err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}

SKIP = "skip"
DENY = "deny"
JOIN = "join"


class ConfigError(Exception):
    """An invalid argument on the module's PAM line."""


class Unavailable(Exception):
    """nsd could not be asked, or could not give the namespace."""


class NotATenant(Exception):
    """nsd says the user is not a tenant."""


class Options:
    __slots__ = (
        "create",
        "debug",
        "nontenant",
        "scope",
        "socket",
        "timeout",
        "uid_min",
        "unreachable",
    )

    def __init__(self) -> None:
        self.socket = DEFAULT_SOCKET
        self.unreachable = SKIP
        self.nontenant = SKIP
        self.uid_min = DEFAULT_UID_MIN
        self.create: bool | None = None
        self.scope = "auto"
        self.timeout = DEFAULT_TIMEOUT
        self.debug = False


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    return value


def _timeout(value: str) -> float:
    try:
        timeout = float(value)
    except ValueError:
        raise ConfigError(f"timeout={value!r}: not a number") from None
    if not 0 < timeout <= 300:
        raise ConfigError(f"timeout={value!r}: must be between 0 and 300 seconds")
    return timeout


def _uid_min(value: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"uid_min={value!r}: not a number")
    return max(1, int(value))  # root is never sent to nsd


def _socket(value: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(f"socket={value!r}: expected an absolute path")
    return value


_CREATE = {"auto": None, "yes": True, "no": False}
_PARSERS: dict[str, Any] = {
    "socket": _socket,
    "unreachable": lambda v: _choice("unreachable", v, (SKIP, DENY)),
    "nontenant": lambda v: _choice("nontenant", v, (SKIP, DENY)),
    "create": lambda v: _CREATE[_choice("create", v, tuple(_CREATE))],
    "scope": lambda v: _choice("scope", v, ("auto", "always", "never")),
    "timeout": _timeout,
    "uid_min": _uid_min,
}


def parse_args(args: list[str]) -> Options:
    """The arguments after the module path on the PAM line."""
    opts = Options()
    for arg in args:
        if arg == "debug":
            opts.debug = True
            continue
        key, eq, value = arg.partition("=")
        parse = _PARSERS.get(key) if eq else None
        if parse is None:
            raise ConfigError(f"unknown argument {arg!r}")
        setattr(opts, key, parse(value))
    return opts


# -- where the process runs ------------------------------------------------------------


def own_cgroup(pid: int | str = "self", proc: str = "/proc") -> str | None:
    """The process's cgroup v2 path (or the v1 name=systemd one on hybrid hosts).

    The rule of nsd.kerneltext.cgroup_path and its decode policy, written again: this
    module runs in the system python3 and cannot import nsd. Lines end at "\n" only
    (a cgroup name may hold "\r"); the path is what follows the second ":"."""
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            data = f.read()
    except OSError:
        return None
    v1 = None
    for line in data.split(b"\n"):
        hid, _, rest = line.partition(b":")
        controllers, sep, path = rest.partition(b":")
        if not sep or not hid.isdigit() or not path.startswith(b"/"):
            continue
        if hid == b"0" and controllers == b"":
            return path.decode("utf-8", "backslashreplace")
        if controllers == b"name=systemd" and v1 is None:
            v1 = path.decode("utf-8", "backslashreplace")
    return v1


def scope_request(  # noqa: PLR0911 - one return per case, in the docstring's order
    policy: str, cgroup: str | None, parent_cgroup: str | None
) -> bool | None:
    """Enter's ``scope`` parameter: True move, False stay, None nsd's policy.

    A logind session is never moved (its scope would empty and logind end the
    session), nor a user manager. A process in a service whose parent is in the
    same cgroup was forked by the service's daemon to run this login or job
    (cron, atd, sshd without pam_systemd): it moves, or the tenant's work would
    count against that service. A service's own main process (PAMName=) is
    left to nsd, whose ``auto`` keeps service processes in their unit.
    """
    if policy == "always":
        return True
    if policy == "never":
        return False
    units = [p for p in (cgroup or "").split("/") if p.endswith((".service", ".scope"))]
    if not units:
        return None
    if any(u.startswith("user@") for u in units):
        return False
    last = units[-1]
    if last.startswith("session-") and last.endswith(".scope"):
        return False
    if last.endswith(".service") and cgroup == parent_cgroup:
        return True
    return None


# -- one varlink call ----------------------------------------------------------------


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_reply(sock: socket.socket, deadline: float, fds: list[int]) -> bytes:
    """One NUL-terminated message; descriptors that come with it are added to ``fds``."""
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        # Not socket.recv_fds: up to 3.12 it drops its flags argument, and the
        # descriptors must be close-on-exec from the moment they arrive.
        data, ancdata, flags, _ = sock.recvmsg(65536, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % 4]))
        if flags & socket.MSG_CTRUNC:
            raise Unavailable("nsd sent more descriptors than expected")
        if not data:
            raise Unavailable("nsd closed the connection without replying")
        end = data.find(b"\0")
        buf += data if end < 0 else data[:end]
        if len(buf) > MAX_REPLY:
            raise Unavailable("nsd's reply is too large")
        if end >= 0:
            return bytes(buf)


def call_enter(
    path: str, params: dict[str, Any], timeout: float
) -> tuple[dict[str, Any], list[int]]:
    """Calls Enter; returns the reply object and the descriptors sent with it.

    The whole exchange is bounded by ``timeout``; the reply by MAX_REPLY bytes
    and MAX_FDS descriptors (more fail the call, and all received are closed).
    """
    deadline = time.monotonic() + timeout
    request = json.dumps({"method": ENTER, "parameters": params}).encode() + b"\0"
    fds: list[int] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        # The path is the trust anchor; root as the peer is a cheap second check.
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(cred[4:8], sys.byteorder) != 0:
            raise Unavailable(f"{path}: the peer does not run as root; not trusting it")
        sock.sendall(request)
        reply = json.loads(_read_reply(sock, deadline, fds))
        if not isinstance(reply, dict):
            raise Unavailable("nsd's reply is not an object")
        return reply, fds
    except TimeoutError:
        _close(fds)
        raise Unavailable(f"nsd did not answer within {timeout:g}s") from None
    except OSError as e:
        _close(fds)
        raise Unavailable(f"cannot reach nsd at {path}: {e.strerror or e}") from None
    except ValueError:
        _close(fds)
        raise Unavailable("nsd's reply is not valid JSON") from None
    except BaseException:
        _close(fds)
        raise
    finally:
        sock.close()


def namespace_of(reply: dict[str, Any], fds: list[int], uid: int) -> tuple[int, str, str | None]:
    """(descriptor, namespace name, scope) from an Enter reply; closes the other
    descriptors (and this one too if the reply is an error or malformed)."""
    keep = -1
    try:
        error = reply.get("error")
        if error is not None:
            detail = json.dumps(reply.get("parameters") or {}, sort_keys=True)
            if error in NONTENANT_ERRORS:
                raise NotATenant(f"{error} {detail}")
            raise Unavailable(f"nsd refused: {error} {detail}")
        params = reply.get("parameters")
        tenant = params.get("tenant") if isinstance(params, dict) else None
        if not isinstance(params, dict) or not isinstance(tenant, dict):
            raise Unavailable("nsd's Enter reply has no tenant")
        if tenant.get("uid") != uid:
            raise Unavailable(f"nsd answered for uid {tenant.get('uid')!r}, not {uid}")
        index = params.get("namespaceFileDescriptor")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(fds):
            raise Unavailable(f"namespaceFileDescriptor {index!r} with {len(fds)} descriptor(s)")
        keep = fds[index]
        inode = tenant.get("namespaceInode")
        if inode is not None and os.fstat(keep).st_ino != inode:
            raise Unavailable(f"nsd sent a descriptor that is not namespace inode {inode}")
        scope = params.get("scope")
        return keep, str(tenant.get("namespacePath", "")), scope if isinstance(scope, str) else None
    except BaseException:
        keep = -1
        raise
    finally:
        _close([fd for fd in fds if fd != keep])


def _setns_net(fd: int) -> None:
    if sys.version_info >= (3, 12):
        os.setns(fd, os.CLONE_NEWNET)
    else:  # Debian 12's python3.11 has no os.setns
        import ctypes  # noqa: PLC0415 - only on old Pythons

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def join(fd: int) -> int:
    """Join the namespace behind ``fd`` (this thread: sshd and cron have one);
    closes ``fd``; returns the namespace inode now in effect."""
    try:
        target = os.fstat(fd).st_ino
        # Defence in depth (a tenant must never be handed the host's namespace);
        # /proc/1 is unreadable in some containers, then there is nothing to compare.
        with contextlib.suppress(OSError):
            if target == os.stat("/proc/1/ns/net").st_ino:
                raise Unavailable("nsd sent the host's network namespace")
        try:
            _setns_net(fd)
        except OSError as e:
            raise Unavailable(f"setns: {e.strerror or e}") from None
    finally:
        os.close(fd)
    now = os.stat("/proc/thread-self/ns/net").st_ino
    if now != target:
        raise Unavailable("not in the tenant's namespace after setns")
    return now


# -- the decision ---------------------------------------------------------------------


class Outcome:
    """What open_session decided: JOIN, SKIP or DENY, with the journal line."""

    __slots__ = ("action", "message", "severity")

    def __init__(self, action: str, severity: str, message: str) -> None:
        self.action = action
        self.severity = severity
        self.message = message


def open_session(user: str, args: list[str], service: str = "") -> Outcome:
    """Everything pam_sm_open_session does, without pamh (tests call this)."""
    svc = f"{service}: " if service else ""
    try:
        opts = parse_args(args)
    except ConfigError as e:
        # A broken PAM line fails closed, except for root, who must be able to fix it.
        uid = _uid(user)
        action = SKIP if uid == 0 else DENY
        return Outcome(action, "err", f"{svc}invalid module arguments ({e}); {action} {user}")
    uid = _uid(user)
    if uid is None or uid < opts.uid_min:
        why = "unknown user" if uid is None else f"uid {uid} below uid_min={opts.uid_min}"
        return Outcome(SKIP, "debug" if opts.debug else "", f"{svc}{user}: {why}; skipped")
    params: dict[str, Any] = {"name": user}
    if opts.create is not None:
        params["create"] = opts.create
    scope = scope_request(opts.scope, own_cgroup(), own_cgroup(os.getppid()))
    if scope is not None:
        params["scope"] = scope
    try:
        reply, fds = call_enter(opts.socket, params, opts.timeout)
        fd, namespace, placed = namespace_of(reply, fds, uid)
        inode = join(fd)
    except NotATenant as e:
        action = opts.nontenant
        sev = "warning" if action == DENY else ("info" if opts.debug else "")
        verb = "login denied" if action == DENY else "login continues in the host namespace"
        return Outcome(action, sev, f"{svc}{user} is not an nsd tenant ({e}): {verb} "
                       f"(nontenant={action})")  # fmt: skip
    except Unavailable as e:
        action = opts.unreachable
        if action == DENY:
            return Outcome(DENY, "err", f"{svc}{user}: nsd unavailable ({e}): login denied "
                           f"(unreachable=deny)")  # fmt: skip
        return Outcome(SKIP, "warning", f"{svc}{user}: nsd unavailable ({e}): login continues "
                       f"OUTSIDE the tenant's namespace (unreachable=skip)")  # fmt: skip
    where = f", moved to {placed}" if placed else ""
    return Outcome(JOIN, "info",
                   f"{svc}{user}: joined namespace {namespace} (inode {inode}){where}")  # fmt: skip


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):
        return None


def log(severity: str, message: str) -> None:
    """One line to syslog as ``pam_nsd[PID]``, without openlog(): the host process
    (sshd, cron) keeps its own syslog identity and facility."""
    pri = _LOG_AUTHPRIV | _SEVERITY[severity]
    line = f"<{pri}>{IDENT}[{os.getpid()}]: {message}".encode("utf-8", "replace")
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError:
        return
    try:
        s.sendto(line[:8192], "/dev/log")
    except OSError:
        pass  # no syslog socket: nothing better to do inside a login
    finally:
        s.close()


# -- libpam-python entry points --------------------------------------------------------


def pam_sm_open_session(pamh: Any, flags: int, argv: list[str]) -> int:
    try:
        user = pamh.get_user(None)
    except pamh.exception:
        user = None
    if not user:
        log("err", "no user name in the PAM handle; session denied")
        return int(pamh.PAM_SESSION_ERR)
    service = getattr(pamh, "service", "") or ""
    outcome = open_session(user, list(argv[1:]), service)
    if outcome.severity:
        log(outcome.severity, outcome.message)
    if outcome.action == DENY:
        return int(pamh.PAM_SESSION_ERR)
    if outcome.action == SKIP:
        return int(pamh.PAM_IGNORE)
    return int(pamh.PAM_SUCCESS)


def pam_sm_close_session(pamh: Any, flags: int, argv: list[str]) -> int:
    # Nothing to undo: the namespace ends with the session's processes.
    return int(pamh.PAM_SUCCESS)
