"""Charts for the metadata UI as inline SVG, drawn on the server: no script, no network, works offline."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

# One colour per compared dataset (train vs eval, model A's data vs model B's).
PALETTE = ("#3f51b5", "#ef6c00", "#2e7d32", "#ad1457")
_FONT = 'font-family="Helvetica, Arial, sans-serif"'


def _n(value: float) -> str:
    return f"{value:.1f}"


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.4g}"


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    out = []
    for i, name in enumerate(names):
        out.append(
            f'<rect x="{_n(x)}" y="{_n(y + 16 * i)}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
        )
        out.append(f'<text x="{_n(x + 14)}" y="{_n(y + 9 + 16 * i)}" font-size="11" {_FONT}>{escape(name)}</text>')
    return out


def bar_chart(labels: Sequence[str], series: Mapping[str, Sequence[float | None]], *, title: str) -> str:
    """Horizontal bars, one group per label, one bar per series (e.g. top values of train and eval)."""
    names = list(series)
    label_w = min(260.0, 12 + 6.5 * max((len(str(lab)) for lab in labels), default=4))
    plot_w, bar_h, gap = 360.0, 12.0, 6.0
    group_h = bar_h * len(names) + gap
    height = 28 + group_h * len(labels) + 16 * len(names) + 10
    width = label_w + plot_w + 80
    top = max((v for vs in series.values() for v in vs if v is not None and math.isfinite(v)), default=0.0) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{_n(width)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(width)} {_n(height)}" role="img" aria-label={quoteattr(title)}>',
        f"<title>{escape(title)}</title>",
        f'<text x="4" y="16" font-size="12" font-weight="bold" {_FONT}>{escape(title)}</text>',
    ]
    for g, label in enumerate(labels):
        y0 = 28 + g * group_h
        out.append(
            f'<text x="{_n(label_w - 6)}" y="{_n(y0 + group_h / 2)}" font-size="11" text-anchor="end" '
            f'dominant-baseline="central" {_FONT}>{escape(str(label))}</text>'
        )
        for i, name in enumerate(names):
            value = series[name][g]
            if value is None or not math.isfinite(value):
                continue
            w = max(0.0, plot_w * value / top)
            y = y0 + i * bar_h
            out.append(
                f'<rect class="bar" x="{_n(label_w)}" y="{_n(y)}" width="{_n(w)}" height="{_n(bar_h - 2)}" '
                f'fill="{PALETTE[i % len(PALETTE)]}" data-series={quoteattr(name)} data-label={quoteattr(str(label))} '
                f'data-value="{value}"><title>{escape(f"{name} · {label}: {_label(value)}")}</title></rect>'
            )
            out.append(
                f'<text x="{_n(label_w + w + 4)}" y="{_n(y + bar_h / 2)}" font-size="10" dominant-baseline="central" '
                f"{_FONT}>{_label(value)}</text>"
            )
    if len(names) > 1:
        out += _legend(names, label_w, 28 + group_h * len(labels) + 4)
    out.append("</svg>")
    return "\n".join(out)


def histogram(series: Mapping[str, Sequence[tuple[float, float, float]]], *, title: str) -> str:
    """Overlaid histograms, each bucket (low, high, count) drawn as its share of its dataset per unit width,
    so datasets of different sizes and bucket edges compare by shape."""
    names = [n for n in series if series[n]]
    lows = [b[0] for n in names for b in series[n]]
    highs = [b[1] for n in names for b in series[n]]
    width, height, left, right, top_pad, bottom = 520.0, 200.0, 46.0, 14.0, 26.0, 34.0
    svg_h = height + 16 * len(names) + 8
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart histogram" width="{_n(width)}" height="{_n(svg_h)}" '
        f'viewBox="0 0 {_n(width)} {_n(svg_h)}" role="img" aria-label={quoteattr(title)}>',
        f"<title>{escape(title)}</title>",
        f'<text x="4" y="16" font-size="12" font-weight="bold" {_FONT}>{escape(title)}</text>',
    ]
    if not names:
        out.append(f'<text x="4" y="40" font-size="11" {_FONT}>no histogram</text></svg>')
        return "\n".join(out)
    x_min, x_max = min(lows), max(highs)
    span = (x_max - x_min) or 1.0
    densities = {}
    for name in names:
        total = sum(b[2] for b in series[name]) or 1.0
        densities[name] = [(lo, hi, c / total / ((hi - lo) or span / 100)) for lo, hi, c in series[name]]
    peak = max(d for n in names for _, _, d in densities[n]) or 1.0
    plot_w, plot_h = width - left - right, height - top_pad - bottom

    def x_of(v: float) -> float:
        return left + plot_w * (v - x_min) / span

    def y_of(d: float) -> float:
        return top_pad + plot_h * (1 - d / peak)

    out.append(
        f'<line x1="{_n(left)}" y1="{_n(top_pad + plot_h)}" x2="{_n(left + plot_w)}" y2="{_n(top_pad + plot_h)}" '
        'stroke="#90a4ae"/>'
    )
    for v, anchor in ((x_min, "start"), ((x_min + x_max) / 2, "middle"), (x_max, "end")):
        out.append(
            f'<text x="{_n(x_of(v))}" y="{_n(top_pad + plot_h + 14)}" font-size="10" text-anchor="{anchor}" '
            f"{_FONT}>{_label(v)}</text>"
        )
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        for lo, hi, d in densities[name]:
            w = max(0.5, x_of(hi) - x_of(lo))
            out.append(
                f'<rect class="bucket" x="{_n(x_of(lo))}" y="{_n(y_of(d))}" width="{_n(w)}" '
                f'height="{_n(top_pad + plot_h - y_of(d))}" fill="{color}" fill-opacity="0.35" stroke="{color}" '
                f'stroke-width="0.8" data-series={quoteattr(name)}>'
                f"<title>{escape(f'{name}: [{_label(lo)}, {_label(hi)})')}</title></rect>"
            )
    out += _legend(names, left, height)
    out.append("</svg>")
    return "\n".join(out)
