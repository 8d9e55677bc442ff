"""Line charts as inline SVG, drawn on the server: no chart library, no script, works offline.

A chart is a string of SVG markup (``markupsafe.Markup``); every number in it is formatted here
and every label escaped, so it is safe to put in a page as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

Point = tuple[float, float]
WIDTH, HEIGHT = 640, 220
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 64, 16, 14, 30
MAX_POINTS = 500  # a long run is thinned to this many points per series


def thin(points: Sequence[Point], limit: int = MAX_POINTS) -> list[Point]:
    """At most ``limit`` points, evenly spaced, always keeping the last."""
    if len(points) <= limit:
        return list(points)
    stride = len(points) / (limit - 1)
    return [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]


def _span(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.001:
        return f"{value:.2e}"
    return f"{value:.4g}"


def line_chart(series: dict[str, Sequence[Point]], title: str, x_label: str = "step") -> Markup:
    """One SVG with a polyline (and dots) per named series; an empty chart says so."""
    drawn = {name: thin(points) for name, points in series.items() if points}
    if not drawn:
        return Markup(f'<p class="empty">{escape(title)}: no points yet</p>')
    xs = [x for points in drawn.values() for x, _ in points]
    ys = [y for points in drawn.values() for _, y in points]
    (x0, x1), (y0, y1) = _span(xs), _span(ys)
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM

    def at(x: float, y: float) -> str:
        return f"{PAD_LEFT + (x - x0) / (x1 - x0) * plot_w:.1f},{PAD_TOP + (y1 - y) / (y1 - y0) * plot_h:.1f}"

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             *_axes(x0, x1, y0, y1, x_label, plot_w, plot_h)]
    for index, (name, points) in enumerate(drawn.items()):
        coords = [at(x, y) for x, y in points]
        parts.append(f'<polyline class="series s{index}" data-series="{escape(name)}" '
                     f'data-points="{len(points)}" points="{" ".join(coords)}"/>')
        if len(points) <= 60:
            parts += [f'<circle class="dot s{index}" r="2.5" cx="{c.split(",")[0]}" '
                      f'cy="{c.split(",")[1]}"/>' for c in coords]
    parts.append(_legend(list(drawn)))
    parts.append("</svg>")
    return Markup("".join(parts))


def _axes(x0: float, x1: float, y0: float, y1: float, x_label: str, plot_w: float,
          plot_h: float) -> list[str]:
    bottom, right = PAD_TOP + plot_h, PAD_LEFT + plot_w
    parts = [f'<line class="axis" x1="{PAD_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}"/>',
             f'<line class="axis" x1="{PAD_LEFT}" y1="{PAD_TOP}" x2="{PAD_LEFT}" y2="{bottom}"/>']
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        y = bottom - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{PAD_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{_label(value)}</text>')
    for value in _step_ticks(x0, x1):
        x = PAD_LEFT + (value - x0) / (x1 - x0) * plot_w
        parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{value}</text>')
    parts.append(f'<text class="tick" x="{right}" y="{HEIGHT - 2}" text-anchor="end">{escape(x_label)}</text>')
    return parts


def _step_ticks(x0: float, x1: float, count: int = 5) -> list[int]:
    """Up to ``count`` whole steps inside [x0, x1], each once (a 2-step run shows 1 and 2)."""
    if not (math.isfinite(x0) and math.isfinite(x1)):
        return []
    values = {int(round(x0 + (x1 - x0) * i / (count - 1))) for i in range(count)}
    return sorted(v for v in values if x0 <= v <= x1)


def _legend(names: list[str]) -> str:
    if len(names) < 2:
        return ""
    return "".join(f'<text class="legend s{i}" x="{PAD_LEFT + 8 + 110 * i}" y="{PAD_TOP + 12}">'
                   f'{escape(name)}</text>' for i, name in enumerate(names))
