"""docs/benchmarks.md: fixed prose around the figures of one run.

Everything with a number in it is filled in from the run's results, so the page never
disagrees with its table; the prose states what was measured, how, and what follows.
"""

from __future__ import annotations

import math
from typing import Any

TIMES = "\u00d7"


def _ms(s: dict[str, Any]) -> str:
    return f"{s['median']:.1f} ms"


def _launcher(r: dict[str, Any]) -> str:
    la = r["launcher"]
    v, an = la["variants_ms"], la["anatomy_ms"]
    wrap = v["wrapper"]["median"]
    rows = ["| variant | median | p10 | p90 | vs wrapper |", "|---|---|---|---|---|"]
    for key, s in v.items():
        rows.append(
            f"| {la['labels'][key]} | {s['median']:.1f} ms | {s['p10']:.1f} | {s['p90']:.1f} "
            f"| {s['median'] / wrap:.2f}{TIMES} |"
        )
    for key, s in an.items():
        rows.append(f"| *{key}* | {s['median']:.1f} ms | {s['p10']:.1f} | {s['p90']:.1f} | |")
    imports = ["| start | top-level imports (cumulative, median of 7) | total |", "|---|---|---|"]
    for key, it in la["importtime"].items():
        top = ", ".join(f"`{m}` {us / 1000:.1f}" for m, us in list(it["top_level_us"].items())[:6])
        imports.append(f"| {la['labels'][key]} | {top} | {it['total_us'] / 1000:.1f} ms |")
    interp = an["python -IS -c pass"]["median"]
    site = an["python -c pass (venv)"]["median"] - interp
    editable = an["python -c pass (editable .venv)"]["median"] - interp
    imp_now = an["python -IS, import nsd.exec"]["median"] - interp
    prop = "proposed-IS" in v
    imp_prop = an["python -IS, import nsd.exec (proposed)"]["median"] - interp if prop else math.nan
    best = v["proposed-IS"] if prop else v["nsd-exec-IS"]
    floor = v["nsenter"]["median"]
    sudo = an["sudo -iu USER true"]["median"]
    return f"""## 1. Launcher overhead

Each variant starts `/bin/true` as the tenant, inside the tenant's namespace, {la["rounds"]}
times, one start of every variant per round in rotating order (after
{la["warmup_rounds"]} warm-up rounds). nsd-exec talks to the bench's daemon with
{r["meta"]["tenants"]} tenants. The wrapper is the seed's script verbatim
(`sudo -iu "$usr" /usr/bin/true`, then `exec nsenter --net=/var/run/netns/usr_$usr
--setuid=$(id -u "$usr") --setgid=$(id -g "$usr") "$@"`; the bench daemon uses the seed's
`usr_<user>` layout so that the script runs unchanged). "pip install" is nsd installed
the way operators install it: `pip install` (not editable) into a fresh venv
({la["install"]}).

{chr(10).join(rows)}

Where the time goes (from the rows in italics, and `python -X importtime`):

{chr(10).join(imports)}

* The interpreter itself (`python -IS -c pass`) costs {interp:.1f} ms. No Python
  launcher gets below that, so "≤ 0.5{TIMES} the wrapper" ({wrap / 2:.1f} ms) is out of reach
  for any Python nsd-exec on this host; the wrapper's own cost is mostly sudo
  ({sudo:.1f} ms for `sudo -iu USER true`).
* `site` adds {site:.1f} ms in a normal venv and {editable:.1f} ms in the editable
  development venv (its `.pth` import hook), which is why the editable figure is not
  the one to quote.
* pip's console-script template runs `import re` before `main()` (~4-6 ms with its
  dependencies).
* nsd.exec's own imports cost {imp_now:.1f} ms today: `json` pulls in `re`, `enum`,
  `functools` and `collections`; `socket` and `signal` pull in `enum` and `selectors`;
  on Python 3.11 `ctypes` is loaded for `setns`.

### Design choice and recommendation

The proposal in `scripts/benchlib/proposals/nsd-exec-imports.patch` keeps nsd-exec's
behaviour and its one-call protocol and changes only what it imports: the C modules
`_socket`, `_signal` and `_json` (decoding the one reply with the C scanner, encoding
the one request with `encode_basestring_ascii`), `json` only on error paths, and on
Python 3.11 `_ctypes` instead of `ctypes` for `setns`. Its import cost is
{imp_prop:.1f} ms instead of {imp_now:.1f} ms. The bench applies the patch to a copy of
the tree and measures it (the "proposed" rows; they disappear once the patch is merged).

Recommended, both parts:

1. apply the patch (every installation gains from it);
2. start nsd-exec through a launcher that runs the interpreter with `-IS` (isolated, no
   `site`) and puts nsd's site-packages on `sys.path` itself, instead of pip's console
   script: five lines, exactly what the bench generates as `nsd-exec-IS`:

   ```python
   #!/opt/nsd/bin/python -IS
   import sys
   sys.path.append("/opt/nsd/lib/python3.11/site-packages")
   from nsd.exec import main
   sys.exit(main())
   ```

   pip cannot generate it (it rewrites a `#!python` line to the bare interpreter path,
   dropping flags), so it belongs in the Debian package or is written at install time.
   `-I` also makes nsd-exec ignore `PYTHONPATH` and friends in a unit's environment.

With both, nsd-exec takes {best["median"]:.1f} ms ({best["median"] / wrap:.2f}{TIMES} the
wrapper, {best["median"] - floor:.1f} ms over bare nsenter at {floor:.1f} ms). Today's
pip-installed nsd-exec takes {v["nsd-exec"]["median"]:.1f} ms
({v["nsd-exec"]["median"] / wrap:.2f}{TIMES}). Getting within a few ms of nsenter would take a
launcher that is not Python (a small C or Rust `nsd-exec` speaking the same varlink
call); the Python one has the advantage of sharing its tests and protocol code with nsd.

**systemd-native template** (`NetworkNamespacePath=` + `Slice=` + `User=`, no launcher
process): expected to add nothing to a unit's start, since systemd joins the namespace
itself before exec. This host has no systemd as PID 1, so it is not measured here; the
VM tier (`scripts/vm-test`) measures it, and `scripts/bench --vm-figures FILE` puts its
figures into this table (keys below).
"""


def _create(r: dict[str, Any]) -> str:
    c = r["create"]
    first, last = c["nsd_first_last_decile_ms"]
    sfirst, slast = c["shell_first_last_decile_ms"]
    return f"""## 2. Tenant creation

N = {c["tenants"]} tenants per side, created one after the other: nsd through
`io.nsd.Tenant.Create` on one connection, the anchor through `tenant-add.sh`, a plain
script of `ip` commands (`ip netns add`, `ip link add … type veth peer … netns …`,
addresses, routes, `ip netns exec … sysctl`; the script is in the results JSON). Both
build the same thing in host namespaces of their own, in {c["chunks"]} chunks in ABBA
order, so both grow to N under the same conditions; the first {c["warmup_tenants"]}
of each side only warm up. nsd runs with `[network] enabled = false` here, because the
script builds no firewall (section 5b measures the policy).

| | median | p10 | p90 | first tenth | last tenth | all N |
|---|---|---|---|---|---|---|
| nsd | {_ms(c["nsd_ms"])} | {c["nsd_ms"]["p10"]:.1f} | {c["nsd_ms"]["p90"]:.1f} | {first:.1f} | {last:.1f} | {c["nsd_total_s"]:.1f} s |
| ip script | {_ms(c["shell_ms"])} | {c["shell_ms"]["p10"]:.1f} | {c["shell_ms"]["p90"]:.1f} | {sfirst:.1f} | {slast:.1f} | {c["shell_total_s"]:.1f} s |

Both get slower as N grows (the kernel's per-namespace and per-route work grows too:
every host veth carries the same gateway addresses, and IPv6 keeps one `fe80::/64`
route per link); the script also pays ~15 process starts per tenant.
"""  # noqa: E501 -- a Markdown table row


def _api(r: dict[str, Any]) -> str:
    api = r["api"]
    oc, orate = api["open_loop"]["clients"], api["open_loop"]["offered_per_s"]
    rows = [
        "| method | clients | load | calls/s | p50 | p90 | p99 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("Get", "Enter"):
        for key, load in (
            (f"{m}@1", "closed"),
            (f"{m}@16", "closed"),
            (f"{m}@64", "closed"),
            (f"{m}@{oc},{orate:.0f}/s", f"{orate:,.0f}/s offered"),
        ):
            c = api[key]
            rows.append(
                f"| {m} | {key.split('@')[1].split(',')[0]} | {load} | {c['calls_per_s']:,.0f} "
                f"| {c['p50_ms']:.2f} ms | {c['p90_ms']:.2f} | {c['p99_ms']:.2f} | {c['errors']} |"
            )
    return f"""## 3. API throughput and latency

`Get` and `Enter` (no scope placement: this host has no systemd) for the
{api["tenants"]} existing tenants, chosen at random per call. The clients are
connections multiplexed by one process with epoll on raw sockets (one call in flight
per connection; Enter's namespace descriptor is received and closed). "closed": every
client calls again as soon as it has its answer, which measures the most calls/s;
its latency is then clients / throughput (Little's law) whatever the daemon does, so
p99 ≤ 5 ms at 64 closed-loop clients would need ~13,000 calls/s. The latency target is
therefore also checked in open loop: {oc} clients together offering {orate:,.0f} calls/s
(the throughput target) on Poisson schedules, latency counted from when each call was
due. {api["reps"]} repetitions of {api["duration_s"]:g} s per cell, Get and Enter
interleaved.

{chr(10).join(rows)}

When the daemon serves fewer calls/s than are offered, the open-loop queue grows for
the whole window and its latencies are queueing, not per-call cost. Where a `Get` and
an `Enter` spend their time (a py-spy profile: NSS lookups that reread /etc/passwd,
SQLite for every lookup, formatting IPv6 addresses, the audit line per `Enter`), and a
patch that takes `Get` to ~17,000 calls/s and `Enter` to ~7,000 calls/s at 1,000
tenants, is in `scripts/benchlib/proposals/README.md` (`api-fast-path.patch`;
measure it with `--daemon-pythonpath`).
"""


def _memory(r: dict[str, Any]) -> str:
    mem = r["memory"]
    n = r["meta"]["tenants"]
    rows = ["| when | RSS | PSS | anonymous |", "|---|---|---|---|"]
    for key, label in (
        ("0", "0 tenants"),
        ("100", "100 tenants"),
        (str(n), f"{n} tenants"),
        ("after_api", "after the API load"),
        ("after_restart", f"after a restart with {n}"),
    ):
        if key in mem and not (key == "100" and n <= 100):
            m = mem[key]
            rows.append(
                f"| {label} | {m['rss_kib'] / 1024:.1f} MiB | {m['pss_kib'] / 1024:.1f} "
                f"MiB | {m.get('anonymous_kib', 0) / 1024:.1f} MiB |"
            )
    rs = r["restart"]["ready_s"]
    return f"""## 4. Daemon memory

RSS and PSS (`/proc/PID/smaps_rollup`) of nsd. Growth per tenant:
{r["memory_growth_kib_per_tenant"]:.1f} KiB (RSS, from 100 to {n} tenants).

{chr(10).join(rows)}

## 5. Restart reconcile

Time from exec of nsd to `READY=1` on a notify socket the bench binds, with {n}
tenants whose namespaces all exist (a daemon restart, not a reboot): {", ".join(f"{x:.2f} s" for x in rs)}.
The start-up reconcile checks every tenant's namespace, veth, addresses, routes and
sysctls.
"""  # noqa: E501 -- one long generated line


def _policy(r: dict[str, Any]) -> str:
    p = r.get("policy")
    if not p:
        return ""
    first, last = p["create_first_last_tenth_ms"]
    rec = p.get("restart_reconcile") or {}
    return f"""## 5b. With the network policy on (nsd's default)

The same daemon with `[network] enabled = true` (nftables tables on the host and in
every tenant, NAT, isolation, shaping), {p["tenants"]} tenants, in a host namespace of
its own: creation {_ms(p["create_ms"])} per tenant (first tenth {first:.0f} ms, last
tenth {last:.0f} ms; {p["create_total_s"]:.1f} s for all), restart to `READY=1`
{p["restart_ready_s"]:.2f} s ({rec.get("actions", "?")} reconcile actions), RSS
{p["memory"]["after_restart"]["rss_kib"] / 1024:.1f} MiB after the restart. If the cost
per tenant grows with the number of tenants, creating N tenants and reconciling them
is quadratic: the profiles and a patch are in `scripts/benchlib/proposals/README.md`
(`network-policy-scaling.patch`).
"""


def render(r: dict[str, Any], table: str, vm_keys: dict[str, str]) -> str:
    meta = r["meta"]
    loads = meta.get("loadavg", {})
    busiest = max((v[0] for v in loads.values()), default=math.nan)
    vm_rows = "\n".join(f"| `{k}` | {v} |" for k, v in vm_keys.items())
    return f"""# Benchmarks

nsd against the tools it replaces, side by side in one run. Everything below comes from

```sh
./scripts/bench              # as root; --quick for a smoke run, --tenants N, --out DIR
```

on {meta["date"]}: {meta["cpus"]} CPUs ({meta["cpu"]}), Linux {meta["kernel"]},
Python {meta["python"]}, {meta["iproute2"]}, {meta["sudo"]}, nsd at `{meta["commit"]}`
{"(with uncommitted changes)" if meta["dirty"] else ""}, N = {meta["tenants"]}. The run
took {meta["total_s"]:.0f} s. The machine is a shared VM: the highest 1-minute load
average seen at a phase boundary was {busiest:.1f}; the anchors are interleaved with
nsd so that such load hits both sides alike, but absolute figures move between runs.
Raw results: `bench-results/*.json` (not committed).

Medians, with p10 to p90 in brackets. "met" is judged against the targets of the
benchmark issue; "—" means there is no target or it applies at N = 1,000 only.

{table}

![launcher](benchmarks/launcher.svg)

![tenant creation](benchmarks/tenant-create.svg)

![API](benchmarks/api.svg)

![memory](benchmarks/memory.svg)

## How it runs

`scripts/bench` installs what it needs (`sudo` for the seed's script, nsd into `.venv`),
then creates N test users (untimed; `useradd` takes ~20 ms each), one test-made "host"
network namespace for nsd and one for the shell anchor, and a daemon on a private
socket and state directory (tests/harness.py's `Daemon`, at `log_level = "info"`). No
interface of the machine itself is touched; all traffic stays inside bench-made
namespaces. Everything it made — users, namespaces, mounts, venvs, temp dirs — is
removed at the end, also after a failure or Ctrl-C. `--quick` (N = 5, few
repetitions) is what `tests/integration/test_bench_smoke.py` runs.

{_launcher(r)}
{_create(r)}
{_api(r)}
{_memory(r)}
{_policy(r)}
## 6. Metrics

Not yet. The benchmark issue was written before the metrics endpoint landed; its
scrape cost with N tenants (and per-tenant memory figures, which need a cgroup v2
host, unlike this one) is the next figure to add here: a `metrics` section in the
results JSON and a row "6 metrics" in the table, which already holds the place.

## 7. Resident helpers: `PAMName=` against the native template

Measured by the VM end-to-end tier (real systemd), not on this host; pass its figures
with `--vm-figures FILE` (default `bench-results/vm-figures.json` if present) and they
appear in the table. The keys it reads:

| key | meaning |
|---|---|
{vm_rows}
"""
