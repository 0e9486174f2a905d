"""nsd-exec: run a command as a tenant, inside the tenant's network namespace.

Usage::

    nsd-exec [--socket PATH] [--no-create] [--scope | --no-scope] [--setenv NAME[=VALUE]]...
             [--timeout SECONDS]
             USER -- CMD [ARGS...]

nsd-exec is the PAM-free launcher. It runs as root (a unit's ``ExecStart=``, a
supervisord program, a cron wrapper) and, in this order:

1. resolves USER through NSS (``getpwnam``);
2. calls ``io.nsd.Tenant.Enter`` on nsd's varlink socket and receives the
   tenant's network namespace as a file descriptor (SCM_RIGHTS), the umask and
   the resource limits (the daemon's socket is ``/run/nsd/io.nsd.Tenant``,
   overridden by ``$NSD_SOCKET`` and then by ``--socket``);
3. checks that the tenant's UID is the UID NSS gave, joins the namespace with
   ``setns(CLONE_NEWNET)`` and checks the namespace inode afterwards;
4. applies the resource limits (before dropping privileges: raising a hard
   limit needs CAP_SYS_RESOURCE) and the umask;
5. drops privileges: ``setgroups`` (the list NSS gave before entering the
   namespace), ``setresgid``, ``setresuid``, then checks
   that they stuck (no way back to UID 0, no capabilities left);
6. builds a clean environment (below), restores the default disposition of
   every signal, empties the signal mask, closes every descriptor except 0-2
   and the socket-activation descriptors, changes to the home directory;
7. executes CMD **in the same process**: no fork, same PID, nothing resident,
   so the service manager's signals reach the workload itself.

Environment policy. The workload's environment starts empty and gets:

* ``HOME``, ``USER``, ``LOGNAME``, ``SHELL`` from NSS (``SHELL`` is ``/bin/sh``
  if the passwd entry has none), and ``PATH=/usr/local/bin:/usr/bin:/bin``;
* these variables, copied from nsd-exec's own environment if set (what service
  managers hand over, and locale/terminal settings)::

    NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID INVOCATION_ID JOURNAL_STREAM
    SYSTEMD_EXEC_PID CREDENTIALS_DIRECTORY RUNTIME_DIRECTORY STATE_DIRECTORY
    CACHE_DIRECTORY LOGS_DIRECTORY CONFIGURATION_DIRECTORY
    MEMORY_PRESSURE_WATCH MEMORY_PRESSURE_WRITE
    SUPERVISOR_ENABLED SUPERVISOR_PROCESS_NAME SUPERVISOR_GROUP_NAME
    LANG LANGUAGE LC_* TERM TZ

* ``LISTEN_FDS``, ``LISTEN_PID`` and ``LISTEN_FDNAMES`` only if ``LISTEN_PID``
  is nsd-exec's own PID (then descriptors 3 .. 3+LISTEN_FDS-1 stay open; the
  PID is the workload's too, since nothing forks);
* finally every ``--setenv NAME=VALUE`` (``--setenv NAME`` copies NAME from
  nsd-exec's environment); these may override anything above, PATH included.

Exit status, as env(1): the workload's own status once it runs; 125 if nsd-exec
itself fails (usage, NSS, daemon unreachable or refusing, namespace, limits,
privileges); 126 if CMD was found but could not be executed; 127 if CMD was not
found. Every failure prints one line ``nsd-exec: ...`` on standard error.

This module runs on every service start, so it imports only small stdlib
modules; it deliberately does not use argparse, asyncio, dataclasses, typing or
the rest of nsd (the varlink framing for this single call is written out here).
"""

from __future__ import annotations

import _signal as signal  # type: ignore[import-not-found]  # C module: signal.py imports enum
import _socket as socket  # the C module: socket.py imports enum and selectors
import errno
import os
import pwd
import resource
import sys
from _json import encode_basestring_ascii as _json_string
from _json import make_scanner as _json_scanner

DEFAULT_SOCKET = "/run/nsd/io.nsd.Tenant"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_TIMEOUT = 30.0

EXIT_FAILURE = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

# Copied from nsd-exec's environment when present. Keep in sync with the module
# docstring and docs/nsd-exec.md.
PASSTHROUGH = (
    # systemd service protocol (sd_notify, watchdog, journal, credentials, directories)
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "SYSTEMD_EXEC_PID",
    "CREDENTIALS_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "CACHE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "MEMORY_PRESSURE_WATCH",
    "MEMORY_PRESSURE_WRITE",
    # supervisord's description of the program (not its control socket URL)
    "SUPERVISOR_ENABLED",
    "SUPERVISOR_PROCESS_NAME",
    "SUPERVISOR_GROUP_NAME",
    # locale and terminal
    "LANG",
    "LANGUAGE",
    "TERM",
    "TZ",
)
PASSTHROUGH_PREFIXES = ("LC_",)
# Passed only when LISTEN_PID names this process (sd_listen_fds(3) protocol).
SOCKET_ACTIVATION = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

CLONE_NEWNET = 0x40000000
SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 4096
MAX_REPLY_BYTES = 1 << 20
MAX_REPLY_FDS = 16
ENTER_METHOD = "io.nsd.Tenant.Enter"

USAGE = """\
usage: nsd-exec [OPTIONS] USER -- CMD [ARGS...]

Run CMD as USER inside USER's nsd network namespace, replacing this process
(no fork: CMD keeps nsd-exec's PID). Must run as root.

options:
  --socket PATH          nsd's varlink socket (default $NSD_SOCKET or
                         /run/nsd/io.nsd.Tenant)
  --no-create            fail instead of creating a missing tenant
  --scope, --no-scope    move into a scope in the tenant's slice, or stay in this
                         unit (default: nsd's policy, systemd.enter_scope)
  --setenv NAME=VALUE    add NAME=VALUE to the workload's environment
  --setenv NAME          copy NAME from nsd-exec's environment (repeatable)
  --timeout SECONDS      how long to wait for nsd (default 30)
  -h, --help             show this help and exit

The workload's environment is HOME, USER, LOGNAME, SHELL, PATH plus a fixed
list of service-manager and locale variables (see docs/nsd-exec.md).
Exit status: the workload's; 125 nsd-exec failed; 126 CMD cannot be executed;
127 CMD not found.
"""


class Failure(Exception):
    """Ends nsd-exec with a one-line message and an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Options:
    __slots__ = ("argv", "create", "scope", "setenv", "socket_path", "timeout", "user")

    def __init__(self) -> None:
        self.socket_path = os.environ.get("NSD_SOCKET") or DEFAULT_SOCKET
        self.create = True
        self.scope: bool | None = None  # None: the daemon's policy
        self.setenv: list[tuple[str, str | None]] = []
        self.timeout = DEFAULT_TIMEOUT
        self.user = ""
        self.argv: list[str] = []


class HelpRequested(Exception):
    pass


def _usage_error(message: str) -> Failure:
    return Failure(f"{message} (try 'nsd-exec --help')")


def parse_args(args: list[str]) -> Options:
    """Parses the arguments after argv[0]. Options come before USER."""
    opts = Options()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            raise HelpRequested
        if arg == "--no-create":
            opts.create = False
            i += 1
        elif arg in ("--scope", "--no-scope"):
            opts.scope = arg == "--scope"
            i += 1
        elif arg.partition("=")[0] in ("--socket", "--setenv", "--timeout"):
            i = _parse_valued_option(opts, args, i)
        elif arg.startswith("-"):
            raise _usage_error(f"unknown option {arg!r}")
        else:
            break
    rest = args[i:]
    if not rest:
        raise _usage_error("missing USER")
    if len(rest) < 2 or rest[1] != "--":
        raise _usage_error("expected '--' after USER")
    if len(rest) < 3 or not rest[2]:
        raise _usage_error("missing CMD after '--'")
    opts.user = rest[0]
    opts.argv = rest[2:]
    return opts


def _parse_valued_option(opts: Options, args: list[str], i: int) -> int:
    """Handles `--name value` and `--name=value`; returns the next index."""
    name, eq, value = args[i].partition("=")
    if not eq:
        if i + 1 >= len(args):
            raise _usage_error(f"option {name} needs a value")
        i += 1
        value = args[i]
    if name == "--socket":
        if not value:
            raise _usage_error("--socket needs a non-empty path")
        opts.socket_path = value
    elif name == "--timeout":
        opts.timeout = _parse_timeout(value)
    else:
        opts.setenv.append(_parse_setenv(value))
    return i + 1


def _parse_timeout(value: str) -> float:
    try:
        timeout = float(value)
    except ValueError:
        raise _usage_error(f"--timeout: not a number: {value!r}") from None
    if not 0 < timeout <= 3600:
        raise _usage_error("--timeout must be between 0 and 3600 seconds")
    return timeout


def _parse_setenv(value: str) -> tuple[str, str | None]:
    name, eq, val = value.partition("=")
    if not name or "\0" in value:
        raise _usage_error(f"--setenv: invalid assignment {value!r}")
    return name, (val if eq else None)


# --- varlink: one call, one reply, with descriptors -----------------------------------


class _JsonContext:
    """What json.JSONDecoder hands the C scanner: importing json costs ~8 ms per start
    (json.decoder imports re, enum, functools, collections)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                      "-Infinity": float("-inf")}.__getitem__  # fmt: skip


def _json_loads(raw: bytes) -> object:
    """json.loads for one reply, on the C scanner alone."""
    text = raw.decode("utf-8")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        # the C scanner reads its options off any object, as JSONDecoder passes itself
        value, end = _json_scanner(_JsonContext())(text, start)  # type: ignore[arg-type]
    except StopIteration:
        raise ValueError("no JSON value") from None
    if text[end:].strip(" \t\n\r"):
        raise ValueError("extra data after the JSON value")
    return value


def _dumps(value: object, sort_keys: bool = False) -> str:
    import json  # noqa: PLC0415 -- error messages only: not paid on the normal path

    return json.dumps(value, sort_keys=sort_keys)


def _peer_uid(sock: socket.socket) -> int:
    # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(cred[4:8], sys.byteorder)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 -- contextlib would cost import time on every service start
            os.close(fd)
        except OSError:
            pass


def _receive_reply(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Reads one NUL-terminated message and the descriptors sent with it."""
    buf = bytearray()
    fds: list[int] = []
    cmsg_space = socket.CMSG_SPACE(MAX_REPLY_FDS * 4)
    try:
        while True:
            data, ancdata, flags, _ = sock.recvmsg(65536, cmsg_space, socket.MSG_CMSG_CLOEXEC)
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % 4
                    fds.extend(
                        int.from_bytes(cdata[j : j + 4], sys.byteorder, signed=True)
                        for j in range(0, usable, 4)
                    )
            if flags & socket.MSG_CTRUNC:
                raise Failure("nsd sent more file descriptors than expected")
            if not data:
                raise Failure("nsd closed the connection without replying")
            end = data.find(b"\0")
            if end >= 0:
                buf += data[:end]
                return bytes(buf), fds
            buf += data
            if len(buf) > MAX_REPLY_BYTES:
                raise Failure("nsd's reply is too large")
    except BaseException:
        _close_all(fds)
        raise


def call_enter(
    path: str, user: str, create: bool, timeout: float, scope: bool | None = None
) -> tuple[object, list[int]]:
    """Calls io.nsd.Tenant.Enter; returns the decoded reply and the descriptors."""
    params = ['"name": ' + _json_string(user)]
    if not create:
        params.append('"create": false')
    if scope is not None:
        params.append('"scope": ' + ("true" if scope else "false"))
    request = (
        f'{{"method": "{ENTER_METHOD}", "parameters": {{{", ".join(params)}}}}}'.encode() + b"\0"
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise Failure(f"cannot connect to nsd at {path}: {_strerror(e)}") from None
        # The socket's path is the trust anchor; the peer's credentials are a cheap
        # second check that we talk to nsd (root) and not something that took its place.
        if _peer_uid(sock) != 0:
            raise Failure(f"refusing to trust {path}: its peer does not run as root")
        try:
            sock.sendall(request)
            raw, fds = _receive_reply(sock)
        except TimeoutError:
            raise Failure(f"nsd at {path} did not answer within {timeout:g}s") from None
        except OSError as e:
            raise Failure(f"talking to nsd at {path}: {_strerror(e)}") from None
    finally:
        sock.close()
    try:
        return _json_loads(raw), fds
    except ValueError:
        _close_all(fds)
        raise Failure("nsd's reply is not valid JSON") from None


class Grant:
    """What Enter returned, validated."""

    __slots__ = ("limits", "name", "ns_fd", "ns_inode", "uid", "umask")

    def __init__(self) -> None:
        self.name = ""
        self.uid = -1
        self.ns_fd = -1
        self.ns_inode: int | None = None
        self.umask = 0o022
        self.limits: list[tuple[str, int, int, int]] = []  # (name, resource, soft, hard)


def _bad_reply(what: str) -> Failure:
    return Failure(f"nsd's Enter reply is malformed: {what}")


def _int(value: object, what: str, low: int = 0, high: int = 1 << 63) -> int:
    """A JSON integer within [low, high); JSON true/false are not integers."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise _bad_reply(f"{what}: {_dumps(value)}")
    return value


def parse_enter_reply(reply: object, fds: list[int]) -> Grant:
    """Validates the reply; keeps the namespace descriptor and closes the others."""
    keep = -1
    try:
        if not isinstance(reply, dict):
            raise _bad_reply("not an object")
        error = reply.get("error")
        if error is not None:
            parameters = reply.get("parameters")
            detail = _dumps(parameters if parameters is not None else {}, sort_keys=True)
            raise Failure(f"nsd refused: {_dumps(error)[1:-1]} {detail}")
        params = reply.get("parameters")
        if not isinstance(params, dict):
            raise _bad_reply("no parameters")
        tenant = params.get("tenant")
        if not isinstance(tenant, dict):
            raise _bad_reply("no tenant")
        grant = Grant()
        name = tenant.get("name")
        if not isinstance(name, str):
            raise _bad_reply("tenant has no name")
        grant.name = name
        grant.uid = _int(tenant.get("uid"), "tenant.uid")
        inode = tenant.get("namespaceInode")
        grant.ns_inode = None if inode is None else _int(inode, "tenant.namespaceInode")
        index = _int(params.get("namespaceFileDescriptor"), "namespaceFileDescriptor")
        if index >= len(fds):
            raise _bad_reply(f"namespaceFileDescriptor {index} but {len(fds)} descriptor(s)")
        keep = fds[index]
        grant.umask = _int(params.get("umask"), "umask", 0, 0o1000)
        limits = params.get("resourceLimits")
        if not isinstance(limits, list):
            raise _bad_reply("resourceLimits is not a list")
        grant.limits = [_parse_limit(item) for item in limits]
        grant.ns_fd = keep
        return grant
    except BaseException:
        keep = -1
        raise
    finally:
        _close_all([fd for fd in fds if fd != keep])


def _parse_limit(item: object) -> tuple[str, int, int, int]:
    if not isinstance(item, dict):
        raise _bad_reply("resource limit is not an object")
    name = item.get("name")
    # Unknown limits fail closed: silently skipping one would run the workload
    # with less restriction than nsd's policy asks for.
    if not isinstance(name, str) or not name.isascii() or not name.isalpha() or not name.islower():
        raise _bad_reply(f"resource limit name {_dumps(name)}")
    number = getattr(resource, "RLIMIT_" + name.upper(), None)
    if not isinstance(number, int):
        raise Failure(f"nsd asks for resource limit {name!r}, which this system does not know")
    # null means unlimited; RLIM_INFINITY is -1 in Python, so compare before mapping.
    soft, hard = (
        None if value is None else _int(value, f"resource limit {name}", 0, 1 << 63)
        for value in (item.get("soft"), item.get("hard"))
    )
    if hard is not None and (soft is None or soft > hard):
        raise _bad_reply(f"resource limit {name}: soft limit above hard limit")
    infinity = resource.RLIM_INFINITY
    return (
        name,
        number,
        infinity if soft is None else soft,
        infinity if hard is None else hard,
    )


# --- the steps -------------------------------------------------------------------------


def _strerror(e: OSError) -> str:
    return e.strerror or str(e)


def _setns_net(fd: int) -> None:
    if sys.version_info >= (3, 12):
        os.setns(fd, os.CLONE_NEWNET)
    else:  # Python 3.11 has no os.setns; pay for ctypes only here.
        # _ctypes directly: the ctypes package costs ~3 ms to import.
        import _ctypes  # noqa: PLC0415

        class CInt(_ctypes._SimpleCData):  # type: ignore[type-arg]  # not subscriptable at run time
            _type_ = "i"

        class Libc:
            _handle = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]  # dlopen(NULL)

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = CInt

        setns = Function(("setns", Libc()))  # type: ignore[arg-type]  # ctypes.CDLL's duck type
        if setns(fd, CLONE_NEWNET) != 0:
            err = _ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def _ns_inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def join_namespace(grant: Grant) -> None:
    fd = grant.ns_fd
    try:
        st = os.fstat(fd)
        target = (st.st_dev, st.st_ino)
        if grant.ns_inode is not None and st.st_ino != grant.ns_inode:
            raise Failure(
                f"nsd sent namespace inode {st.st_ino}, but tenant {grant.name!r} "
                f"has namespace inode {grant.ns_inode}"
            )
        # Defence in depth: a tenant must never be handed the host's namespace.
        if target == _ns_inode("/proc/1/ns/net"):
            raise Failure(f"nsd sent the host's network namespace for tenant {grant.name!r}")
        try:
            _setns_net(fd)
        except OSError as e:
            raise Failure(f"cannot join the network namespace: setns: {_strerror(e)}") from None
    finally:
        os.close(fd)
    now = _ns_inode("/proc/thread-self/ns/net")
    if now != target:
        raise Failure(f"still not in tenant {grant.name!r}'s network namespace after setns")


def apply_limits(grant: Grant) -> None:
    for name, number, soft, hard in grant.limits:
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as e:
            raise Failure(f"cannot set resource limit {name} to ({soft}, {hard}): {e}") from None
    os.umask(grant.umask)


def supplementary_groups(pw: pwd.struct_passwd) -> list[int]:
    """The user's groups, looked up through NSS while still in the host's namespace
    (an NSS backend that talks to the network must not run in the tenant's)."""
    try:
        return os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError as e:
        raise Failure(f"cannot look up the groups of {pw.pw_name!r}: {_strerror(e)}") from None


def drop_privileges(pw: pwd.struct_passwd, groups: list[int]) -> None:
    uid, gid = pw.pw_uid, pw.pw_gid
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise Failure(f"cannot switch to user {pw.pw_name!r}: {_strerror(e)}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise Failure(f"switching to user {pw.pw_name!r} did not take effect")
    if uid == 0:
        return
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise Failure("could regain root after dropping privileges; refusing to continue")
    # SECBIT_KEEP_CAPS / SECBIT_NO_SETUID_FIXUP in the caller would keep capabilities
    # across setresuid; the workload must start with none.
    try:
        with open("/proc/thread-self/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("CapPrm", "CapEff", "CapAmb") and int(value, 16) != 0:
                    raise Failure(f"capabilities remain after dropping privileges ({key})")
    except OSError as e:
        raise Failure(f"cannot verify capabilities: {_strerror(e)}") from None


def build_environment(pw: pwd.struct_passwd, opts: Options) -> dict[str, str]:
    source = os.environ
    env: dict[str, str] = {}
    for key in PASSTHROUGH:
        value = source.get(key)
        if value is not None:
            env[key] = value
    for key, value in source.items():
        if key.startswith(PASSTHROUGH_PREFIXES):
            env[key] = value
    if _listen_fds(source.get("LISTEN_PID"), source.get("LISTEN_FDS")) > 0:
        for key in SOCKET_ACTIVATION:
            value = source.get(key)
            if value is not None:
                env[key] = value
    env["HOME"] = pw.pw_dir
    env["USER"] = pw.pw_name
    env["LOGNAME"] = pw.pw_name
    env["SHELL"] = pw.pw_shell or "/bin/sh"
    env["PATH"] = DEFAULT_PATH
    for key, maybe in opts.setenv:
        if maybe is not None:
            env[key] = maybe
        elif key in source:
            env[key] = source[key]
    return env


def _listen_fds(pid: str | None, count: str | None) -> int:
    """How many socket-activation descriptors are meant for this process."""
    if pid != str(os.getpid()) or count is None:
        return 0
    if not count.isascii() or not count.isdigit() or not 0 < int(count) <= MAX_LISTEN_FDS:
        return 0
    return int(count)


def reset_signals() -> None:
    # exec resets caught signals but keeps ignored ones; Python ignores SIGPIPE and
    # SIGXFSZ, and the caller may have ignored or blocked more.
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:  # noqa: SIM105 -- see _close_all
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # e.g. signals reserved by the C library
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def close_descriptors(keep_listen: int) -> None:
    os.closerange(SD_LISTEN_FDS_START + keep_listen, 0x7FFFFFFF)


def change_directory(home: str) -> None:
    try:
        os.chdir(home)
    except OSError as e:
        _say(f"warning: cannot change directory to {home}: {_strerror(e)}; using /")
        os.chdir("/")


def execute(argv: list[str], env: dict[str, str]) -> Failure:
    """Executes argv[0] like execvp(3) along env's PATH; returns only on failure."""
    cmd = argv[0]
    if "/" in cmd:
        candidates = [cmd]
    else:
        candidates = [f"{d}/{cmd}" if d else cmd for d in env.get("PATH", DEFAULT_PATH).split(":")]
    denied: OSError | None = None
    for path in candidates:
        try:
            os.execve(path, argv, env)  # noqa: S606 -- executing CMD is the whole point
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ENODEV):
                continue
            if e.errno == errno.EACCES and len(candidates) > 1:
                denied = denied or e
                continue
            return Failure(f"{path}: {_strerror(e)}", EXIT_CANNOT_EXECUTE)
    if denied is not None:
        return Failure(f"{cmd}: {_strerror(denied)}", EXIT_CANNOT_EXECUTE)
    if "/" in cmd:
        return Failure(f"{cmd}: No such file or directory", EXIT_NOT_FOUND)
    return Failure(f"{cmd}: command not found", EXIT_NOT_FOUND)


def _say(message: str) -> None:
    # Straight to fd 2: nothing buffered is lost at exec, and a closed stderr is no error.
    try:  # noqa: SIM105 -- see _close_all
        os.write(2, f"nsd-exec: {message}\n".encode(errors="backslashreplace"))
    except OSError:
        pass


def run(args: list[str]) -> int:
    opts = parse_args(args)
    try:
        pw = pwd.getpwnam(opts.user)
    except (KeyError, ValueError):
        raise Failure(f"no such user: {opts.user!r}") from None
    groups = supplementary_groups(pw)
    reply, fds = call_enter(opts.socket_path, opts.user, opts.create, opts.timeout, opts.scope)
    grant = parse_enter_reply(reply, fds)
    if grant.uid != pw.pw_uid or grant.name != pw.pw_name:
        os.close(grant.ns_fd)
        raise Failure(
            f"identity mismatch: NSS says {pw.pw_name!r} is uid {pw.pw_uid}, "
            f"nsd answered tenant {grant.name!r} with uid {grant.uid}"
        )
    join_namespace(grant)
    apply_limits(grant)
    drop_privileges(pw, groups)
    env = build_environment(pw, opts)
    change_directory(pw.pw_dir)
    keep = _listen_fds(env.get("LISTEN_PID"), env.get("LISTEN_FDS"))
    reset_signals()
    close_descriptors(keep)
    raise execute(opts.argv, env)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return run(args)
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except Failure as e:
        _say(e.message)
        return e.status
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: still one line and 125, never a traceback and 1
        _say(f"internal error: {type(e).__name__}: {e}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
