"""The summary table, the targets, and docs/benchmarks.md with its SVG charts."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

from . import doc
from .svg import COLORS, Bar, hbar

MIB = 1024.0

#: Where scripts/vm-test leaves the results of its last run (phase*/figures.json).
VM_RESULTS = Path("/var/cache/nsd-vm/last-results")


def load_vm_figures(path: Path | None) -> dict[str, Any]:
    """The VM e2e tier's figures (tests/e2e record them; scripts/vm-test reads them back):
    a figures JSON, or a results directory whose phase*/figures.json are merged."""
    if path is None or not path.exists():
        return {"source": None}
    if path.is_dir():
        files = sorted(path.glob("phase*/figures.json"))
        if not files:
            return {"source": None}
        figures: dict[str, Any] = {}
        for f in files:
            figures.update(json.loads(f.read_text()))
        newest = max(f.stat().st_mtime for f in files)
    else:
        figures = json.loads(path.read_text())
        newest = path.stat().st_mtime
    taken = datetime.datetime.fromtimestamp(newest, datetime.UTC).strftime("%Y-%m-%dT%H:%MZ")
    return {"source": str(path), "taken": taken, "figures": figures}


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def _spread(s: dict[str, Any], unit: str = "ms", fmt: str = ".1f") -> str:
    return f"{s['median']:{fmt}} {unit} [{s['p10']:{fmt}}\u2013{s['p90']:{fmt}}]"


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


class _Rows:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(  # noqa: PLR0917 -- a table row reads best positionally
        self,
        comparison: str,
        metric: str,
        nsd: str,
        anchor: str = "—",
        ratio: str = "",
        target: str = "",
        met: bool | None = None,
        **extra: Any,
    ) -> None:
        self.rows.append(
            {
                "comparison": comparison,
                "metric": metric,
                "nsd": nsd,
                "anchor": anchor,
                "ratio": ratio,
                "target": target,
                "met": met,
                **extra,
            }
        )


def derive(r: dict[str, Any]) -> None:
    """Add ``r["summary"]`` (one row per figure, with anchor, ratio, target, met) and
    ``r["targets"]`` (each target: met, not met, or not measurable here)."""
    t = _Rows()
    n = r["meta"]["tenants"]
    full = n >= 1000
    _launcher_rows(t, r)
    _create_rows(t, r, n)
    _api_rows(t, r)
    growth = _memory_rows(t, r, n, full)
    rs = r["restart"]["ready_s"]
    actions = [x["actions"] for x in r["restart"].get("reconcile", []) if x]
    med = _median(rs)
    t.add(
        "5 restart",
        f"exec → READY=1 with {n} tenants",
        f"{med:.2f} s [{min(rs):.2f}\u2013{max(rs):.2f}], {max(actions, default=0)} repairs",
        target="≤ 5 s at 1,000",
        met=med <= 5 if full else None,
    )
    if r.get("policy"):
        _policy_rows(t, r)
    if r.get("boot"):
        _boot_rows(t, r, full)
    _metrics_rows(t, r)
    _resident_rows(t, r)
    r["summary"] = t.rows
    r["memory_growth_kib_per_tenant"] = growth


def _launcher_rows(t: _Rows, r: dict[str, Any]) -> None:
    la = r["launcher"]
    v = la["variants_ms"]
    wrap, floor = v["wrapper"], v["nsenter"]
    anchor = f"wrapper {_spread(wrap)}"
    s = v["nsd-exec"]
    q = s["median"] / wrap["median"]
    gap = s["median"] - floor["median"]
    t.add(
        "1 launcher",
        f"{la['labels']['nsd-exec']} → /bin/true",
        _spread(s),
        anchor,
        f"{q:.2f}\u00d7 ({gap:+.1f} ms over nsenter)",
        "≤ 0.3\u00d7 wrapper and ≤ nsenter + 2 ms",
        q <= 0.3 and gap <= 2,
        gap_to_floor_ms=gap,
        key="nsd-exec",
    )
    t.add(
        "1 launcher",
        "bare nsenter (floor)",
        _spread(floor),
        anchor,
        f"{floor['median'] / wrap['median']:.2f}\u00d7",
    )
    starts = (r.get("vm", {}).get("figures") or {}).get("unit_start_ms")
    if starts:
        plain = starts["plain"]
        for key, label in (
            ("native", "systemd-native template (VM: systemd-run --wait)"),
            ("nsd-exec", "unit through nsd-exec (VM: systemd-run --wait)"),
            ("pamname", "unit with PAMName= (VM: systemd-run --wait)"),
        ):
            if key in starts:
                t.add(
                    "1 launcher",
                    f"{label} → /bin/true",
                    f"{starts[key]:.1f} ms",
                    f"plain User= unit {plain:.1f} ms",
                    f"{starts[key] - plain:+.1f} ms",
                    "expected: no added cost" if key == "native" else "",
                )
    else:
        t.add(
            "1 launcher",
            "systemd-native template",
            "not measured: no systemd as PID 1 here, no VM figures given",
            "plain unit",
            "",
            "expected: no added cost (VM tier)",
        )


def _metrics_rows(t: _Rows, r: dict[str, Any]) -> None:
    m = r.get("metrics")
    if not m:
        t.add("6 metrics", "sampler and scrape", "not measured (--metrics-processes 0)")
        return
    procs = m["proc_scan_contained"]["processes"]
    t.add(
        "6 metrics",
        f"one sample, {m['tenants']} tenants, {procs:,} processes",
        f"{m['sampler_total']['median_ms']:.0f} ms (worker thread)",
        target="(off the event loop; every 15 s)",
    )
    t.add(
        "6 metrics",
        f"one scrape, {m['series_total']:,} series",
        f"{m['scrape_text']['median_ms']:.1f} ms text, "
        f"{m['scrape_text_gzip']['median_ms']:.1f} ms gzip "
        f"({m['scrape_text']['bytes'] / 1e6:.1f} MB / "
        f"{m['scrape_text_gzip']['bytes'] / 1e6:.2f} MB)",
        target="(pre-rendered once per sample)",
    )


def _resident_rows(t: _Rows, r: dict[str, Any]) -> None:
    mem = (r.get("vm", {}).get("figures") or {}).get("memory_per_service")
    if not mem:
        t.add(
            "7 resident helpers",
            "resident per service",
            "from the VM tier (no figures given)",
            "PAMName= (sd-pam)",
            target="0 resident (nsd-exec execs)",
        )
        return
    pam = mem["pamname"]
    per_pam_rss = pam["sd_pam_rss_kib_total"] / pam["services"]
    per_pam_pss = pam["sd_pam_pss_kib_total"] / pam["services"]
    for key, label in (("nsd-exec", "through nsd-exec"), ("native", "native template")):
        v = mem[key]
        t.add(
            "7 resident helpers",
            f"helper processes per service, {label}",
            f"{v['sd_pam_processes'] / v['services']:.0f} "
            f"({v['sd_pam_rss_kib_total'] / v['services']:.0f} KiB)",
            f"PAMName= {pam['sd_pam_processes'] / pam['services']:.0f} (sd-pam: "
            f"RSS {per_pam_rss:,.0f} KiB, PSS {per_pam_pss:,.0f} KiB)",
            target="0 resident",
            met=v["sd_pam_processes"] == 0,
        )
    t.add(
        "7 resident helpers",
        "service cgroup memory (median), nsd-exec / native",
        f"{mem['nsd-exec']['memory_current_median_bytes'] / 1024:,.0f} KiB / "
        f"{mem['native']['memory_current_median_bytes'] / 1024:,.0f} KiB",
        f"PAMName= {pam['memory_current_median_bytes'] / 1024:,.0f} KiB",
        f"{pam['memory_current_median_bytes'] / mem['nsd-exec']['memory_current_median_bytes']:.1f}"
        "\u00d7 less",
    )


def _create_rows(t: _Rows, r: dict[str, Any], n: int) -> None:
    c = r["create"]
    a, b = c["nsd_ms"], c["shell_ms"]
    sp = c["speedup_median"]
    t.add(
        "2 create",
        f"per tenant, N={n} (median [p10\u2013p90])",
        _spread(a),
        f"ip script {_spread(b)}",
        f"{sp:.1f}\u00d7 faster",
        "≥ 4\u00d7 faster",
        sp >= 4,
    )
    t.add(
        "2 create",
        f"{n} tenants end to end",
        f"{c['nsd_total_s']:.1f} s",
        f"ip script {c['shell_total_s']:.1f} s",
        f"{c['speedup_total']:.1f}\u00d7 faster",
        "≥ 4\u00d7 faster",
        c["speedup_total"] >= 4,
    )


def _api_rows(t: _Rows, r: dict[str, Any]) -> None:
    api = r["api"]
    oc, orate = api["open_loop"]["clients"], api["open_loop"]["offered_per_s"]
    for method in ("Get", "Enter"):
        sat = api[f"{method}@64"]["calls_per_s"]
        for conc in (1, 16, 64):
            cell = api[f"{method}@{conc}"]
            target, met = "", None
            if conc == 64:
                target, met = "≥ 5,000 calls/s", sat >= 5000
            t.add(
                "3 API",
                f"{method}, {conc} client{'s' if conc > 1 else ''}, closed loop",
                f"{cell['calls_per_s']:,.0f}/s, p50 {cell['p50_ms']:.2f} ms, "
                f"p99 {cell['p99_ms']:.2f} ms",
                target=target,
                met=met,
                errors=cell["errors"],
            )
        cell = api[f"{method}@{oc},{orate:.0f}/s"]
        t.add(
            "3 API",
            f"{method}, {oc} clients offering {orate:,.0f}/s (open loop)",
            f"{cell['calls_per_s']:,.0f}/s served, p50 {cell['p50_ms']:.2f} ms, "
            f"p99 {cell['p99_ms']:.2f} ms",
            target="p99 ≤ 5 ms",
            met=cell["p99_ms"] <= 5,
            errors=cell["errors"],
        )


def _memory_rows(t: _Rows, r: dict[str, Any], n: int, full: bool) -> float:
    mem = r["memory"]
    top = str(n)
    for key, label in (
        ("0", "0 tenants"),
        ("100", "100 tenants"),
        (top, f"{n} tenants"),
        ("after_api", f"{n} tenants, after the API load"),
        ("after_restart", f"{n} tenants, after a restart"),
    ):
        if key not in mem or (key == "100" and n <= 100):
            continue
        m = mem[key]
        target, met = "", None
        if key in (top, "after_restart", "after_api"):
            target = "≤ 60 MB at 1,000"
            met = m["rss_kib"] * 1024 <= 60e6 if full else None
        t.add(
            "4 memory",
            label,
            f"RSS {m['rss_kib'] / MIB:.1f} MiB, PSS {m['pss_kib'] / MIB:.1f} MiB",
            target=target,
            met=met,
        )
    growth = _growth(mem, n)
    t.add(
        "4 memory",
        "growth per tenant (RSS)",
        f"{growth:.1f} KiB",
        target="≤ 20 KB",
        met=growth * 1.024 <= 20 if n > 100 else None,
    )
    return growth


def _policy_rows(t: _Rows, r: dict[str, Any]) -> None:
    p = r["policy"]
    k = p["tenants"]
    first, last = p["create_first_last_tenth_ms"]
    # the script's first tenth of N: the tenant counts closest to K
    shell = r["create"]["shell_first_last_decile_ms"][0]
    t.add(
        "5b policy on",
        f"create per tenant, N={k}, [network] enabled (default)",
        f"{_spread(p['create_ms'])}; first tenth {first:.0f} ms, last {last:.0f} ms",
        f"ip script {shell:.1f} ms (first tenth; no firewall)",
        _faster(shell, p["create_ms"]["median"]),
        "(policy off is the like-for-like figure)",
        None,
    )
    rec = p.get("restart_reconcile") or {}
    mem = p["memory"]["after_restart"]
    t.add(
        "5b policy on",
        f"exec → READY=1 with {k} tenants",
        f"{p['restart_ready_s']:.2f} s, {rec.get('actions', '?')} actions; "
        f"RSS after {mem['rss_kib'] / MIB:.1f} MiB",
        target="≤ 5 s at 1,000",
    )


def boot_figures(b: dict[str, Any], create: dict[str, Any] | None = None) -> dict[str, Any]:
    """The boot section's medians and their ratios to the floors of the same run."""
    n = b["tenants"]
    f: dict[str, Any] = {
        "n": n,
        "cold_s": _median(b["cold_ready_s"]),
        "warm_s": _median(b["warm_ready_s"]),
        "ip_batch_s": _median(b["ip_batch_s"]),
        "floor_create_s": _median(b["floor_create_s"]),
        "floor_check_s": _median(b["floor_check_s"]),
        "cold_enter_s": _median(b["cold_enter_s"]) if b.get("cold_enter_s") else None,
        "cold_actions": max((x["actions"] for x in b["cold_reconcile"] if x), default=0),
        "warm_repairs": max((x["actions"] for x in b["warm_reconcile"] if x), default=0),
        "concurrent_per_s": n / b["concurrent_create_s"],
    }
    f["floor_create_ms_per_tenant"] = f["floor_create_s"] / n * 1000
    f["floor_per_s"] = n / f["floor_create_s"]
    f["cold_vs_batch"] = f["cold_s"] / f["ip_batch_s"]
    f["cold_vs_floor"] = f["cold_s"] / f["floor_create_s"]
    f["warm_vs_floor"] = f["warm_s"] / f["floor_check_s"]
    f["concurrent_vs_floor"] = f["concurrent_per_s"] / f["floor_per_s"]
    if "serial_create_s" in b:
        f["serial_ms_per_tenant"] = b["serial_create_s"] / n * 1000
        f["remove_ms_per_tenant"] = b["serial_remove_s"] / n * 1000
    elif create is not None:  # results of runs before the boot section created serially
        f["serial_ms_per_tenant"] = create["nsd_total_s"] / create["tenants"] * 1000
    if "serial_ms_per_tenant" in f:
        f["serial_vs_floor"] = f["serial_ms_per_tenant"] / f["floor_create_ms_per_tenant"]
    return f


def _boot_rows(t: _Rows, r: dict[str, Any], full: bool) -> None:
    f = boot_figures(r["boot"], r.get("create"))
    n = f["n"]
    cold = r["boot"]["cold_ready_s"]
    t.add(
        "8 boot",
        f"cold start (no namespace, no veth) → READY=1, {n} tenants",
        f"{f['cold_s']:.2f} s [{min(cold):.2f}\u2013{max(cold):.2f}], {f['cold_actions']} actions",
        f"ip -batch floor {f['ip_batch_s']:.2f} s",
        f"{f['cold_vs_batch']:.1f}\u00d7 the floor",
        "≤ 2.5\u00d7 the ip -batch floor",
        f["cold_vs_batch"] <= 2.5 if full else None,
        key="cold",
    )
    if f["cold_enter_s"] is not None:
        t.add(
            "8 boot",
            "cold start → Enter answered for the tenant reconciled last",
            f"{f['cold_enter_s']:.2f} s (READY=1 {f['cold_s']:.2f} s)",
            "—",
            "—",
        )
    t.add(
        "8 boot",
        "cold start, against nsd's own per-tenant work in C",
        f"{f['cold_s']:.2f} s",
        f"nsd-floor create {f['floor_create_s']:.2f} s",
        f"{f['cold_vs_floor']:.1f}\u00d7 the floor",
    )
    warm = r["boot"]["warm_ready_s"]
    t.add(
        "8 boot",
        f"warm restart (all present) → READY=1, {n} tenants",
        f"{f['warm_s']:.2f} s [{min(warm):.2f}\u2013{max(warm):.2f}], {f['warm_repairs']} repairs",
        f"nsd-floor check {f['floor_check_s']:.2f} s",
        f"{f['warm_vs_floor']:.1f}\u00d7 the floor",
        "≤ 1.5 s, 0 repairs",
        (f["warm_s"] <= 1.5 and f["warm_repairs"] == 0) if full else None,
        key="warm",
    )
    if "serial_ms_per_tenant" in f:
        t.add(
            "8 boot",
            f"serial Create, {n} tenants on one connection (end to end / N)",
            f"{f['serial_ms_per_tenant']:.1f} ms per tenant",
            f"nsd-floor create {f['floor_create_ms_per_tenant']:.2f} ms per tenant",
            f"{f['serial_vs_floor']:.1f}\u00d7 the floor",
            "≤ 5 ms per tenant",
            f["serial_ms_per_tenant"] <= 5 if full else None,
            key="serial",
        )
    t.add(
        "8 boot",
        f"{r['boot']['concurrent_clients']} concurrent clients, Create of {n} distinct tenants",
        f"{f['concurrent_per_s']:.0f} tenants/s",
        f"nsd-floor create {f['floor_per_s']:.0f} tenants/s (one thread)",
        f"{f['concurrent_vs_floor']:.2f}\u00d7 the floor's rate",
        "≥ 300 tenants/s",
        f["concurrent_per_s"] >= 300 if full else None,
        key="concurrent",
    )


def boot_text(b: dict[str, Any]) -> str:
    """The boot section alone (scripts/bench --boot-only)."""
    t = _Rows()
    _boot_rows(t, {"boot": b}, b["tenants"] >= 1000)
    return "\n".join(f"{x['metric']}: {x['nsd']} | {x['anchor']} | {x['ratio']}" for x in t.rows)


def _faster(anchor: float, nsd: float) -> str:
    if nsd <= anchor:
        return f"{anchor / nsd:.1f}\u00d7 faster"
    return f"{nsd / anchor:.1f}\u00d7 slower"


def _growth(mem: dict[str, Any], n: int) -> float:
    lo = "100" if n > 100 and "100" in mem else "0"
    span = n - int(lo)
    return (mem[str(n)]["rss_kib"] - mem[lo]["rss_kib"]) / span if span else math.nan


def met_text(m: bool | None) -> str:
    return {True: "yes", False: "NO", None: "—"}[m]


_COLS = ("comparison", "metric", "nsd", "anchor", "ratio", "target", "met")


def table_text(r: dict[str, Any]) -> str:
    rows = [[str(x[c]) if c != "met" else met_text(x[c]) for c in _COLS] for x in r["summary"]]
    widths = [max(len(c), *(len(rw[i]) for rw in rows)) for i, c in enumerate(_COLS)]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(_COLS, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    out += ["  ".join(c.ljust(w) for c, w in zip(rw, widths, strict=True)) for rw in rows]
    return "\n".join(out)


def table_md(r: dict[str, Any]) -> str:
    head = ("", "figure", "nsd", "anchor", "nsd vs anchor", "target", "met")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in r["summary"]:
        cells = [str(x[c]) if c != "met" else met_text(x[c]) for c in _COLS]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


# -- charts -------------------------------------------------------------------------


def charts(r: dict[str, Any]) -> dict[str, str]:
    return {
        "launcher.svg": _launcher_chart(r),
        "tenant-create.svg": _create_chart(r),
        "api.svg": _api_chart(r),
        "memory.svg": _memory_chart(r),
    }


def _launcher_chart(r: dict[str, Any]) -> str:
    la = r["launcher"]
    v, an = la["variants_ms"], la["anatomy_ms"]
    colors = {
        "nsd-exec": COLORS["nsd"],
        "wrapper": COLORS["anchor"],
        "nsenter": COLORS["floor"],
    }
    bars = [Bar(la["labels"][k], s["median"], s["p10"], s["p90"], colors[k]) for k, s in v.items()]
    for key, label in (
        ("sudo -iu USER true", "  of the wrapper: sudo -iu USER true"),
        ("/bin/true", "  /bin/true alone"),
    ):
        s = an[key]
        bars.append(Bar(label, s["median"], s["p10"], s["p90"], COLORS["part"]))
    return hbar(
        "Start /bin/true as a tenant, in its network namespace",
        "milliseconds per start (median; whiskers p10\u2013p90)",
        bars,
        subtitle=f"{la['rounds']} interleaved rounds, N={r['meta']['tenants']} tenants; "
        f"{r['meta']['cpus']} CPUs, {r['meta']['cpu'][:40]}",
    )


def _create_chart(r: dict[str, Any]) -> str:
    c = r["create"]
    a, b = c["nsd_ms"], c["shell_ms"]
    return hbar(
        f"Create a tenant (namespace, veth, IPv4 + IPv6, routes, sysctl), N={c['tenants']}",
        "milliseconds per tenant (median; whiskers p10\u2013p90)",
        [
            Bar(
                "nsd (varlink Create)",
                a["median"],
                a["p10"],
                a["p90"],
                COLORS["nsd"],
                f"{a['median']:.1f} ms; all {c['tenants']}: {c['nsd_total_s']:.1f} s",
            ),
            Bar(
                "shell script of ip commands",
                b["median"],
                b["p10"],
                b["p90"],
                COLORS["anchor"],
                f"{b['median']:.1f} ms; all {c['tenants']}: {c['shell_total_s']:.1f} s",
            ),
        ],
        subtitle=f"{c['chunks']} interleaved chunks (ABBA); nsd {c['speedup_median']:.1f}\u00d7 "
        "faster per tenant",
    )


def _api_chart(r: dict[str, Any]) -> str:
    api = r["api"]
    bars = []
    for m in ("Get", "Enter"):
        for conc in (1, 16, 64):
            cell = api[f"{m}@{conc}"]
            bars.append(
                Bar(
                    f"{m}, {conc} client{'s' if conc > 1 else ''}",
                    cell["calls_per_s"],
                    color=COLORS["nsd"] if m == "Get" else COLORS["nsd-alt"],
                    text=f"{cell['calls_per_s']:,.0f}/s  p99 {cell['p99_ms']:.2f} ms",
                )
            )
    return hbar(
        f"API calls per second, closed loop, {api['tenants']} tenants",
        "calls per second",
        bars,
        target=5000,
        target_label="target at 64 clients: 5,000/s",
    )


def _memory_chart(r: dict[str, Any]) -> str:
    mem = r["memory"]
    n = r["meta"]["tenants"]
    bars = []
    for key, label in (
        ("0", "0 tenants"),
        ("100", "100 tenants"),
        (str(n), f"{n} tenants"),
        ("after_restart", f"{n} tenants, after restart"),
    ):
        if key in mem and not (key == "100" and n <= 100):
            m = mem[key]
            bars.append(Bar(f"{label}: RSS", m["rss_kib"] / MIB, color=COLORS["nsd"]))
            bars.append(Bar(f"{label}: PSS", m["pss_kib"] / MIB, color=COLORS["nsd-alt"]))
    return hbar("nsd's memory", "MiB", bars, target=60e6 / 2**20, target_label="target: 60 MB")


def render_docs(r: dict[str, Any], docs_dir: Path) -> list[Path]:
    out_dir = docs_dir / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in charts(r).items():
        p = out_dir / name
        p.write_text(text)
        written.append(p)
    md = docs_dir / "benchmarks.md"
    md.write_text(doc.render(r, table_md(r)))
    written.append(md)
    return written
