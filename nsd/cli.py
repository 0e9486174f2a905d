"""nsctl: the admin CLI, in the style of machinectl, ip netns and systemctl.

Tables for people by default, ``--json`` for scripts (``nsctl list --json`` is
the address map a proxy generator consumes). Options may stand anywhere on the
line, before or after the command, as with systemctl. Exit status 0 on success and 1 on
failure, with one line on stderr that names the varlink error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from nsd import faultview, topview
from nsd.varlink.client import VarlinkClient, VarlinkError
from nsd.varlink.protocol import ServiceUnavailable

DEFAULT_SOCKET = "/run/nsd/io.nsd.Tenant"
T = "io.nsd.Tenant."
D = "io.nsd.Daemon."

# Human sentences for every error the daemon names; parameters fill them in.
_MESSAGES: dict[str, str] = {
    "NoSuchTenant": "no tenant named {name}",
    "TenantExists": "tenant {name} already exists",
    "InvalidTenantName": "invalid tenant name {name!r}: {reason}",
    "NoSuchUser": "no Unix user named {name}",
    "UidOutOfRange": "user {name} has uid {uid}, outside the managed range {minimum}-{maximum}",
    "TenantIdentityChanged": "tenant {recordedName} (uid {uid}) changed identity: {reason}",
    "AddressPoolExhausted": "no free {family} address left in pool {pool}",
    "AddressConflict": "{family} address {address} derived for this uid is already leased "
    "to another tenant",
    "NamespaceExists": "namespace {path} exists and was not made by nsd (adopt_existing is off)",
    "TenantBusy": "tenant {name} still has {processes} process(es) using its namespace; "
    "use --force to stop them",
    "TenantLocked": "another operation on tenant {name} did not finish in time",
    "NetworkSetupFailed": "network set-up of {name} failed at {step}: {message}",
    "ShuttingDown": "nsd is shutting down",
    "InternalError": "internal error in nsd (details are in its log)",
    "InvalidLimit": "invalid {field} {value!r}: {reason}",
    "InvalidCommand": "invalid command: {reason}",
    "SystemdUnavailable": "systemd is unavailable: {reason}",
    "SystemdRequestFailed": "systemd could not handle {unit}: {message}",
    "InvalidFaultQuery": "invalid {parameter}: {reason}",
    "WatcherTooSlow": "the watch fell behind and was dropped; run it again",
    "UsageUnavailable": "no usage data: {reason}",
    "StateWriteFailed": "cannot write nsd's state database {path}: {reason} "
    "(free space in or make writable its directory, then run nsctl reconcile)",
    "PermissionDenied": "permission denied (root or the admin group needed, or ask about yourself)",
    "InvalidParameter": "invalid parameter {parameter}",
    "MethodNotFound": "the daemon does not know method {method} (version mismatch?)",
    "InterfaceNotFound": "the daemon does not offer interface {interface} (version mismatch?)",
    "ConnectionLimitReached": "nsd refused the connection: {reason}",
    "CallTimedOut": "the call took longer than {seconds:g} s and was cancelled",
    "StreamLimitReached": "you already run {maximum} streaming calls (watch, top); end one first",
}


def describe(err: VarlinkError) -> str:
    short = err.name.rsplit(".", 1)[-1]
    template = _MESSAGES.get(short)
    text = short
    if template is not None:
        try:
            text = template.format(**err.parameters)
        except (KeyError, IndexError, ValueError):
            text = f"{short} {json.dumps(err.parameters)}"
    return f"{text} [{err.name}]"


class Cli:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = args.json

    def client(self) -> VarlinkClient:
        return VarlinkClient(self.args.socket)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        with self.client() as c:
            return c.call(method, {k: v for k, v in params.items() if v is not None})

    def out(self, data: Any, human: Callable[[], None]) -> None:
        if self.json:
            json.dump(data, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        else:
            human()

    # -- commands ---------------------------------------------------------------

    def cmd_create(self) -> None:
        t = self.call(T + "Create", name=self.args.user)["tenant"]
        self.out(t, lambda: print(f"created {t['name']}: {t['ipv4Address']} "
                                  f"{t['ipv6Address']} in {t['namespacePath']}"))  # fmt: skip

    def cmd_ensure(self) -> None:
        r = self.call(T + "Ensure", name=self.args.user)
        t = r["tenant"]
        verb = "created" if r["created"] else "ok"
        self.out(r, lambda: print(f"{verb} {t['name']}: {t['ipv4Address']} {t['ipv6Address']} "
                                  f"in {t['namespacePath']}"))  # fmt: skip

    def cmd_remove(self) -> None:
        self.call(T + "Remove", name=self.args.user, force=self.args.force or None)
        self.out({}, lambda: print(f"removed {self.args.user}"))

    def cmd_list(self) -> None:
        tenants = self.call(T + "List")["tenants"]
        rows = [
            (t["name"], str(t["uid"]), t["state"], t["ipv4Address"], t["ipv6Address"],
             t["hostInterface"], t["namespacePath"], "!" if t["problems"] else "")
            for t in tenants
        ]  # fmt: skip

        def human() -> None:
            table(("USER", "UID", "STATE", "IPV4", "IPV6", "LINK", "NAMESPACE", ""), rows)
            print(f"\n{len(rows)} tenant(s)")

        self.out(tenants, human)

    def cmd_show(self) -> None:
        t = self.call(T + "Get", name=self.args.user)["tenant"]

        def human() -> None:
            created = datetime.fromtimestamp(t["createdUSec"] / 1e6, UTC).isoformat(
                timespec="seconds"
            )
            pairs = [
                ("Name", t["name"]), ("UID", t["uid"]), ("State", t["state"]),
                ("Namespace", t["namespacePath"]),
                ("Inode", t["namespaceInode"] or "(not mounted)"),
                ("Host link", t["hostInterface"]), ("Tenant link", t["tenantInterface"]),
                ("IPv4", f"{t['ipv4Address']} via {t['ipv4Gateway']}"),
                ("IPv6", f"{t['ipv6Address']} ({t['ipv6Prefix']}) via {t['ipv6Gateway']}"),
                ("Slice", t["slice"] or "(no systemd)"),
                ("Adopted", "yes" if t["adopted"] else "no"), ("Created", created),
            ]  # fmt: skip
            key_values(pairs, t["problems"])

        self.out(t, human)

    def cmd_limits(self) -> None:
        a = self.args
        changes = {api: getattr(a, attr) for api, attr in _LIMIT_OPTIONS if getattr(a, attr)}
        if changes or a.reset:
            r = self.call(T + "SetLimits", name=a.user, limits=changes, reset=a.reset or None)
        else:
            r = self.call(T + "GetLimits", name=a.user)

        def human() -> None:
            rows = []
            for api, _ in _LIMIT_OPTIONS:
                value = r["limits"].get(api)
                source = "tenant" if api in r["overrides"] else ("default" if value else "")
                rows.append((_limit_label(api), _human_size(api, value), source))
            table(("LIMIT", "VALUE", "FROM"), rows)

        self.out(r, human)

    def cmd_run(self) -> None:
        a = self.args
        command = list(a.argv)
        wait = a.wait
        # `nsctl run USER --wait -- CMD`: options after USER land in the remainder.
        while command and command[0] != "--" and command[0].startswith("-"):
            if command.pop(0) != "--wait":
                raise SystemExit(f"nsctl run: unknown option before '--' in {a.argv!r}")
            wait = True
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise SystemExit("nsctl run: no command given")
        if not command[0].startswith("/"):
            # systemd needs an absolute path; resolve it here, on the caller's PATH.
            found = shutil.which(command[0])
            if found is None:
                raise SystemExit(f"nsctl run: {command[0]}: command not found")
            command[0] = found
        r = self.call(T + "Run", name=a.user, command=command, wait=wait or None)
        if self.json:
            self.out(r, lambda: None)
        elif wait:
            print(f"{r['unit']}: {r['result']}, exit status {r['exitStatus']}", file=sys.stderr)
        else:
            print(r["unit"])
        if wait and r.get("exitStatus"):
            raise SystemExit(int(r["exitStatus"]))

    def cmd_net(self) -> None:
        a = self.args
        if a.egress or a.ingress or a.reset:
            r = self.call(T + "SetBandwidth", name=a.user, egressRate=a.egress,
                          ingressRate=a.ingress, reset=a.reset or None)["network"]  # fmt: skip
        else:
            r = self.call(T + "GetNetwork", name=a.user)["network"]
        t = self.call(T + "Get", name=a.user)["tenant"]

        def rate(value: int | None, override: int | None) -> str:
            text = "unlimited" if not value else f"{value / 1e6:g} Mbit/s"
            return f"{text} ({'tenant' if override is not None else 'default'})"

        def human() -> None:
            if not r["enabled"]:
                print("network policy: off (network.enabled = false)")
            services = "; ".join(
                f"{s['name']} {s['address']} -> {s['host']} ({' '.join(s['protocols'])})"
                for s in r["services"]
            )
            pairs = [
                ("Addresses", f"{t['ipv4Address']} {t['ipv6Address']} ({t['ipv6Prefix']})"),
                ("Gateways", f"{t['ipv4Gateway']} {t['ipv6Gateway']}"),
                ("Routes", "; ".join(r["routes"]) or "-"),
                ("Egress", f"{r['egress']} via {', '.join(r['uplinks']) or '-'}"),
                ("Isolation", f"{'on' if r['isolation'] else 'off'}; may connect to: "
                              f"{', '.join(r['allowedTo']) or '-'}; reachable from: "
                              f"{', '.join(r['allowedFrom']) or '-'}"),
                ("Connections", f"{r['connections']} (limit {r['conntrackLimit'] or 'none'})"),
                ("Services", services or "-"),
                ("Upload", rate(r["egressRate"], r["egressOverride"])),
                ("Download", rate(r["ingressRate"], r["ingressOverride"])),
            ]  # fmt: skip
            key_values(pairs, r["problems"])

        self.out(r, human)

    def cmd_doctor(self) -> None:
        checks = self.call(D + "Doctor")["checks"]
        mark = {"ok": "ok", "warning": "WARN", "error": "FAIL"}
        self.out(checks, lambda: table(
            ("CHECK", "RESULT", "DETAIL"),
            [(c["name"], mark[c["severity"]], c["message"]) for c in checks],
        ))  # fmt: skip
        if any(c["severity"] == "error" for c in checks):
            raise SystemExit(1)

    def cmd_reconcile(self) -> None:
        r = self.call(D + "Reconcile")

        def human() -> None:
            for a in r["actions"]:
                print(f"{a['kind']}: {a['tenant'] or '-'}: {a['detail']}")
            for p in r["problems"]:
                print(f"problem: {p}")
            print(f"{len(r['actions'])} action(s), {len(r['problems'])} problem(s)")

        self.out(r, human)

    def cmd_status(self) -> None:
        r = self.call(D + "Status")

        def human() -> None:
            print(f"nsd {r['version']} (pid {r['pid']}), {r['tenants']} tenant(s)")
            for line in r["degraded"]:
                print(f"degraded: {line}")

        self.out(r, human)

    def cmd_top(self) -> None:
        a = self.args
        params = {"name": a.user} if a.user else {}
        if not a.watch:
            r = self.call(T + "GetUsage", **params)
            self.out(r, lambda: print(topview.format_top(r, a.sort)))
            return
        clear = sys.stdout.isatty() and not self.json
        with self.client() as c:
            for r in c.call_more(T + "GetUsage", params):
                if self.json:
                    print(json.dumps(r, sort_keys=True), flush=True)
                    continue
                # Home and clear on a terminal; blank-line separated blocks in a pipe.
                print(("\x1b[H\x1b[2J" if clear else "\n") + topview.format_top(r, a.sort),
                      flush=True)  # fmt: skip

    def cmd_audit(self) -> None:
        a = self.args
        r = self.call(T + "Audit", name=a.user, helpers=a.helpers or None)
        self.out(r, lambda: print(topview.format_audit(r)))
        if r["processes"] and any(p["reason"] != "helper" for p in r["processes"]):
            raise SystemExit(1)  # flagged processes: non-zero, for scripts and cron

    def cmd_faults(self) -> None:
        a = self.args
        params: dict[str, Any] = {"limit": a.limit}
        if a.user:
            params["name"] = a.user
        if a.since:
            try:
                params["sinceUSec"] = faultview.parse_since(a.since)
            except ValueError as e:
                raise SystemExit(f"nsctl: {e}") from None
        r = self.call(T + "GetFaults", **params)
        self.out(r, lambda: print(faultview.format_faults(r)))

    def cmd_watch(self) -> None:
        with self.client() as c:
            for reply in c.call_more(
                T + "Watch", {"name": self.args.user} if self.args.user else {}
            ):
                if self.json:
                    print(json.dumps(reply, sort_keys=True), flush=True)
                else:
                    t = reply.get("tenant")
                    f = reply.get("fault")
                    what = f" {f['kind']} x{f['count']}" if f else ""
                    print(f"{reply['event']}" + (f" {t['name']} {t['state']}" if t else "")
                          + what, flush=True)  # fmt: skip


_LIMIT_OPTIONS = (
    ("memoryMin", "memory_min"), ("memoryLow", "memory_low"), ("memoryHigh", "memory_high"),
    ("memoryMax", "memory_max"), ("memorySwapMax", "memory_swap_max"),
    ("cpuWeight", "cpu_weight"), ("cpuQuota", "cpu_quota"), ("tasksMax", "tasks_max"),
    ("ioWeight", "io_weight"),
)  # fmt: skip


def _limit_label(api: str) -> str:
    return {"cpuWeight": "CPUWeight", "cpuQuota": "CPUQuota", "ioWeight": "IOWeight"}.get(
        api, api[0].upper() + api[1:]
    )


def _human_size(api: str, value: str | None) -> str:
    if value is None:
        return "-"
    if not api.startswith("memory") or not value.isdigit():
        return value
    n = int(value)
    for unit in ("T", "G", "M", "K"):
        size = 1 << {"T": 40, "G": 30, "M": 20, "K": 10}[unit]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return value


def key_values(pairs: Sequence[tuple[str, object]], problems: Sequence[str]) -> None:
    """`nsctl show`-style output: right-aligned keys, then one line per problem."""
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k:>{width}}: {v}")
    for p in problems:
        print(f"{'Problem':>{width}}: {p}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def _global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--socket`` and ``--json``, accepted before and after the command.

    systemctl and machinectl users write ``nsctl show alice --json``. Every
    subparser takes the options too, with ``SUPPRESS`` as its default so that an
    option given before the command is not reset by the subparser's default.
    """
    sock_default = os.environ.get("NSD_SOCKET", DEFAULT_SOCKET) if defaults else argparse.SUPPRESS
    p.add_argument("--socket", default=sock_default,
                   help=f"varlink socket (default {DEFAULT_SOCKET}, or $NSD_SOCKET)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output",
                   default=False if defaults else argparse.SUPPRESS)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsctl", description="Manage nsd tenants.")
    _global_options(p, defaults=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("create", "create a tenant for an existing Unix user"),
        ("ensure", "create, complete or repair a tenant (idempotent; for unit files)"),
        ("remove", "remove a tenant (refused while it has processes, unless --force)"),
        ("show", "show one tenant"),
    ):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("user")
        if name == "remove":
            sp.add_argument(
                "--force", action="store_true", help="stop the tenant's processes first"
            )
    sub.add_parser("list", help="list tenants (--json: the address map for proxies)")
    lim = sub.add_parser("limits", help="show or change a tenant's resource limits")
    lim.add_argument("user")
    for _api, attr in _LIMIT_OPTIONS:
        lim.add_argument("--" + attr.replace("_", "-"), dest=attr, metavar="VALUE",
                         help="e.g. 512M, 2G, infinity; weights 1-10000; quota 150%%")  # fmt: skip
    lim.add_argument("--reset", action="append", metavar="LIMIT",
                     choices=[api for api, _ in _LIMIT_OPTIONS],
                     help="return a limit (API name, e.g. memoryMax) to the default")  # fmt: skip
    run = sub.add_parser("run", help="run a command as the tenant in its namespace and slice")
    run.add_argument("--wait", action="store_true", help="wait and exit with its status")
    run.add_argument("user")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    net = sub.add_parser("net", help="show a tenant's network (routes, policy, limits) "
                         "or set its bandwidth")  # fmt: skip
    net.add_argument("user")
    net.add_argument("--egress", metavar="RATE", help="upload limit, e.g. 10M; 0 = unlimited")
    net.add_argument("--ingress", metavar="RATE", help="download limit, e.g. 100M")
    net.add_argument("--reset", action="append", choices=["egress", "ingress"],
                     help="return a limit to the configured default")  # fmt: skip
    sub.add_parser("doctor", help="check host prerequisites")
    sub.add_parser("reconcile", help="repair differences between the store and the host")
    sub.add_parser("status", help="show the daemon's status")
    top = sub.add_parser("top", help="per-tenant memory, helpers and OOM kills, by memory")
    top.add_argument("user", nargs="?")
    top.add_argument("--sort", choices=sorted(topview.SORTS), default="memory")
    top.add_argument("--watch", action="store_true", help="redraw after every sample")
    audit = sub.add_parser("audit", help="tenant processes outside their slice or namespace")
    audit.add_argument("user", nargs="?")
    audit.add_argument("--helpers", action="store_true",
                       help="also list helper processes (sd-pam, su, sudo, ...)")  # fmt: skip
    faults = sub.add_parser("faults", help="limits tenants hit, with the processes then")
    faults.add_argument("user", nargs="?")
    faults.add_argument(
        "--since",
        metavar="TIME",
        help="an age (15min, 2h, 1d) or a date and time (2026-12-05 04:00)",
    )
    faults.add_argument("--limit", type=int, default=1000, help="at most this many, newest")
    w = sub.add_parser("watch", help="stream tenant events")
    w.add_argument("user", nargs="?")
    for command in sub.choices.values():
        _global_options(command, defaults=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cli = Cli(args)
    try:
        getattr(cli, f"cmd_{args.command}")()
    except VarlinkError as e:
        print(f"nsctl: {describe(e)}", file=sys.stderr)
        return 1
    except (ServiceUnavailable, FileNotFoundError) as e:
        print(f"nsctl: cannot reach nsd at {args.socket}: {e.strerror or e} "
              "(is the daemon running?)", file=sys.stderr)  # fmt: skip
        return 1
    except BrokenPipeError:
        return 0  # stdout closed (nsctl ... | head)
    except ConnectionError as e:
        # Connected, then lost: the daemon is running, so do not suggest otherwise.
        print(f"nsctl: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
