"""Hand-written SVG bar charts (no plotting library: the bench installs nothing)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
COLORS = {
    "nsd": "#2b6cb0",
    "nsd-alt": "#63b3ed",
    "anchor": "#c05621",
    "floor": "#718096",
    "part": "#a0aec0",
}


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    lo: float | None = None
    hi: float | None = None
    color: str = COLORS["nsd"]
    text: str | None = None  # shown after the bar instead of the value


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def hbar(
    title: str,
    unit: str,
    bars: list[Bar],
    *,
    subtitle: str = "",
    target: float | None = None,
    target_label: str = "target",
    plot_w: int = 420,
) -> str:
    """A horizontal bar chart: one bar per row, optional p10-p90 whiskers, optional
    vertical target line. The value text after each bar gets room of its own."""
    label_w, row_h, top = 290, 28, 58
    longest = max((len(b.text or _fmt(b.value)) for b in bars), default=4)
    right_pad = 20 + int(6.6 * longest)
    width = label_w + plot_w + right_pad
    height = top + row_h * len(bars) + 44
    finite = [b.hi if b.hi is not None else b.value for b in bars]
    finite = [v for v in finite if not math.isnan(v)]
    vmax = max([*finite, target or 0, 1e-9]) * 1.08
    step = _nice_step(vmax)
    vmax = math.ceil(vmax / step) * step

    def x(v: float) -> float:
        return label_w + plot_w * max(0.0, v) / vmax

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {FONT} font-size='12'>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='12' y='22' font-size='15' font-weight='bold'>{escape(title)}</text>",
    ]
    if subtitle:
        out.append(f"<text x='12' y='40' fill='#4a5568'>{escape(subtitle)}</text>")
    axis_y = top + row_h * len(bars) + 4
    tick = 0.0
    while tick <= vmax + 1e-9:
        tx = x(tick)
        out.append(
            f"<line x1='{tx:.1f}' y1='{top - 6}' x2='{tx:.1f}' y2='{axis_y}' stroke='#e2e8f0'/>"
        )
        out.append(
            f"<text x='{tx:.1f}' y='{axis_y + 16}' text-anchor='middle' fill='#4a5568'>"
            f"{_fmt(tick)}</text>"
        )
        tick += step
    out.append(
        f"<text x='{label_w + plot_w / 2:.0f}' y='{axis_y + 34}' text-anchor='middle' "
        f"fill='#4a5568'>{escape(unit)}</text>"
    )
    if target is not None:
        tx = x(target)
        out.append(
            f"<line x1='{tx:.1f}' y1='{top - 8}' x2='{tx:.1f}' y2='{axis_y}' "
            "stroke='#c53030' stroke-width='1.5' stroke-dasharray='5,3'/>"
        )
        out.append(
            f"<text x='{tx + 4:.1f}' y='{top - 10}' fill='#c53030'>{escape(target_label)}</text>"
        )
    for i, b in enumerate(bars):
        y = top + i * row_h
        out.append(
            f"<text x='{label_w - 8}' y='{y + row_h / 2 + 4:.1f}' text-anchor='end'>"
            f"{escape(b.label)}</text>"
        )
        if math.isnan(b.value):  # not measured
            out.append(
                f"<text x='{label_w + 4}' y='{y + row_h / 2 + 4:.1f}' fill='#718096'>"
                f"{escape(b.text or 'not measured')}</text>"
            )
            continue
        out.append(
            f"<rect x='{label_w}' y='{y + 5}' width='{x(b.value) - label_w:.1f}' "
            f"height='{row_h - 10}' fill='{b.color}'/>"
        )
        end = x(b.value)
        if b.lo is not None and b.hi is not None:
            ym = y + row_h / 2
            x1, x2 = x(b.lo), x(b.hi)
            out.append(
                f"<line x1='{x1:.1f}' y1='{ym:.1f}' x2='{x2:.1f}' y2='{ym:.1f}' "
                "stroke='#1a202c' stroke-width='1.2'/>"
            )
            for xx in (x1, x2):
                out.append(
                    f"<line x1='{xx:.1f}' y1='{ym - 5:.1f}' x2='{xx:.1f}' y2='{ym + 5:.1f}' "
                    "stroke='#1a202c' stroke-width='1.2'/>"
                )
            end = max(end, x2)
        out.append(
            f"<text x='{end + 5:.1f}' y='{y + row_h / 2 + 4:.1f}' fill='#1a202c' "
            "paint-order='stroke' stroke='white' stroke-width='3'>"
            f"{escape(b.text or _fmt(b.value))}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
