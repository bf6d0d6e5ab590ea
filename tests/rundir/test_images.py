"""The TensorBoard pictures (layerwatch.rundir.images): labelled heatmaps and depth profiles from zero, and the fallback.

Pixels are checked against what the chart must show: the data cells' colours at known positions, text in the axis
margins, and bar heights proportional to the values (bars start at zero).
"""

import numpy as np
import pytest

from layerwatch.rundir import images

STEPS = [0, 1, 2, 4, 8, 16, 25, 50, 75, 100]
LAYERS = list(range(9))
VIRIDIS_LOW, VIRIDIS_HIGH = np.array([68, 1, 84]), np.array([253, 231, 37])
BAR_BLUE = np.array([0x31, 0x82, 0xBD])


def _dark(region):
    return int((region.astype(int).sum(-1) < 300).sum())  # text and axis lines are dark on white


def _near(pixel, colour, tolerance=12):
    return np.abs(pixel.astype(int) - colour).max() <= tolerance


def test_heatmap_has_axes_labels_and_a_colour_bar():
    pytest.importorskip("matplotlib")
    matrix = np.linspace(0, 1, len(LAYERS) * len(STEPS)).reshape(len(STEPS), len(LAYERS)).T  # min at (0, 0)
    picture = images.heatmap(matrix, STEPS, LAYERS, metric="prompt_entropy")
    height, width, channels = picture.shape
    assert channels == 3 and picture.dtype == np.uint8
    assert width >= 800 and height >= 440  # readable without zooming (the old picture was 408 x 60 with no text)
    dpi, scale = images.TENSORBOARD_DPI, images.TENSORBOARD_SCALE
    left, bottom, right, top = (int(m * scale * dpi) for m in (0.75, 0.95, 1.45, 0.4))  # the margins, in pixels
    assert _dark(picture[:, : left - 4]) > 200  # layer tick labels and the "layer" axis label
    assert _dark(picture[height - bottom + 4 :, left:-right]) > 300  # step tick labels and the "step" label
    assert _dark(picture[:, width - right // 2 :]) > 100  # the colour bar's values and label
    # data cells: layer 0 at the bottom, the first step on the left (lowest value = dark purple), highest top right
    plot = picture[top + 3 : height - bottom - 3, left + 3 : width - right - 3]
    assert _near(plot[-2, 2], VIRIDIS_LOW) and _near(plot[2, -2], VIRIDIS_HIGH)
    # the log-spaced steps are drawn as equal columns, and the chart says so
    figure = images.heatmap_figure(matrix, STEPS, LAYERS, metric="prompt_entropy")
    assert images.NOT_TO_SCALE in figure.axes[0].get_xlabel()
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == [str(s) for s in STEPS]
    assert figure.axes[1].get_ylabel() == "prompt_entropy"  # the colour bar
    even = images.heatmap_figure(matrix, list(range(0, 100, 10)), LAYERS, metric="m")
    assert images.NOT_TO_SCALE not in even.axes[0].get_xlabel()


def _bar_heights(picture, count):
    blue = np.abs(picture.astype(int) - BAR_BLUE).max(-1) <= 10
    columns = np.flatnonzero(blue.any(0))
    groups = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    assert len(groups) == count
    return np.array([blue[:, g[len(g) // 2]].sum() for g in groups], dtype=float)


def test_depth_profile_bars_start_at_zero_and_print_values():
    pytest.importorskip("matplotlib")
    values = np.array([0.53, 0.84, 2.017, 2.067])
    picture = images.depth_profile(values, [0, 1, 2, 3], metric="x", step=7)
    heights = _bar_heights(picture, 4)
    np.testing.assert_allclose(heights / heights.max(), values / values.max(), atol=0.02)  # not min..max scaled
    figure = images.profile_figure(values, [0, 1, 2, 3], metric="x", step=7)
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert labels == ["0.530", "0.840", "2.02", "2.07"]  # 3 significant digits
    assert figure.axes[0].get_ylim()[0] == 0.0 and "step 7" in figure.axes[0].get_title()


def test_without_matplotlib_the_plain_renderers_are_used(monkeypatch):
    monkeypatch.setattr(images, "have_matplotlib", lambda: False)
    matrix = np.arange(12, dtype=float).reshape(3, 4)
    picture = images.heatmap(matrix, [0, 1, 2, 3], [0, 1, 2], metric="m")
    assert picture.shape == (3 * 12, 4 * 24, 3)
    assert _near(picture[-1, 0], VIRIDIS_LOW, 0) and _near(picture[0, -1], VIRIDIS_HIGH, 0)  # layer 0 at the bottom
    bars = images.depth_profile(np.array([1.0, 2.0, 4.0]), metric="m")
    heights = [(bars[:, 16 * i + 8] != 255).any(-1).sum() for i in range(3)]
    assert heights == [30, 60, 120]  # from zero: height proportional to the value


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.53, "0.530"), (2.017, "2.02"), (41.23, "41.2"), (1350.4, "1350"), (-2.38e-07, "-2.38e-07"), (0.0, "0"),
     (-0.0, "0"), (-0.0004999, "-5.00e-04"), (float("nan"), "nan"), (2.5e6, "2.50e+06")],
)
def test_format_value_has_three_significant_digits_and_no_minus_zero(value, text):
    assert images.format_value(value) == text


def test_small_heatmap_thumbnail_keeps_layer_zero_at_the_bottom_with_few_ticks():
    pytest.importorskip("matplotlib")
    figure = images.new_figure(3, 3)
    axes = figure.add_subplot()
    matrix = np.arange(31 * 5, dtype=float).reshape(31, 5)
    image = images.draw_small_heatmap(axes, matrix, [0, 10, 20, 30, 40], list(range(31)), title="prompt_entropy")
    assert axes.get_ylim()[0] < axes.get_ylim()[1]  # origin lower
    assert [t.get_text() for t in axes.get_yticklabels()] == ["0", "15", "30"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["0", "40"]
    assert image.get_clim() == (0.0, float(31 * 5 - 1)) and axes.get_title() == "prompt_entropy"


def test_symlog_step_axis_has_no_empty_negative_range():
    pytest.importorskip("matplotlib")
    axes = images.new_figure(4, 3).add_subplot()
    steps = [1, 2, 4, 8, 50, 120]
    axes.plot(steps, steps)
    images.set_step_scale(axes, steps)
    assert axes.get_xscale() == "symlog" and 0 < axes.get_xlim()[0] <= 1 and axes.get_xlim()[1] >= 120
