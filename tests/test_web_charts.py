"""The SVG charts: points land inside the plot, long runs are thinned, labels are escaped."""

from __future__ import annotations

import re

from lora_farm.web.charts import HEIGHT, MAX_POINTS, WIDTH, line_chart, thin


def coordinates(svg: str) -> list[tuple[float, float]]:
    points = re.search(r'<polyline [^>]*points="([^"]+)"', svg).group(1)
    return [tuple(map(float, pair.split(","))) for pair in points.split()]


def test_points_fall_inside_the_plot_with_the_first_step_left_and_the_lowest_loss_low():
    svg = line_chart({"loss": [(1, 1.0), (2, 0.5), (3, 0.25)]}, "loss")
    xy = coordinates(svg)
    assert len(xy) == 3 and all(0 <= x <= WIDTH and 0 <= y <= HEIGHT for x, y in xy)
    assert xy[0][0] < xy[1][0] < xy[2][0] and xy[0][1] < xy[2][1]  # SVG y grows downwards


def test_a_two_step_run_labels_each_step_once_and_a_flat_series_draws():
    svg = line_chart({"lr": [(1, 1e-4), (2, 1e-4)]}, "learning rate")
    ticks = re.findall(r'text-anchor="middle">(\d+)</text>', svg)
    assert ticks == ["1", "2"] and 'data-points="2"' in svg


def test_long_runs_are_thinned_keeping_the_last_point():
    points = [(float(i), 1.0 / (i + 1)) for i in range(10_000)]
    kept = thin(points)
    assert len(kept) == MAX_POINTS and kept[-1] == points[-1] and kept[0] == points[0]
    assert f'data-points="{MAX_POINTS}"' in line_chart({"loss": points}, "loss")


def test_no_points_says_so_and_labels_are_escaped():
    assert "no points yet" in line_chart({"loss": []}, "loss")
    svg = line_chart({"<b>": [(1, 1.0)]}, "<script>")
    assert "<script>" not in svg and "&lt;script&gt;" in svg
