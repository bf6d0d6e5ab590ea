"""The pictures layerwatch draws: layer x step heatmaps and depth profiles, for TensorBoard and the reports.

With matplotlib (the normal install) the pictures are real charts: labelled layer and step axes, a colour bar with
values, bars from zero with their values printed. The drawing functions here are shared by the TensorBoard writer
(:func:`heatmap`, :func:`depth_profile`, which return ``[H, W, 3]`` uint8 arrays) and by ``layerwatch report``
(:func:`heatmap_figure`, :func:`draw_heatmap`), so the two look alike.

Without matplotlib, :func:`heatmap` and :func:`depth_profile` fall back to small numpy renderers that carry no text:
layers on the vertical axis with layer 0 at the bottom, one column per probe, bars from zero.

Figures are built as bare ``matplotlib.figure.Figure`` objects rendered by the Agg canvas (no pyplot), so drawing
never changes the plotting backend of the training process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

NOT_TO_SCALE = "one column per probe; not to scale"
NAN_COLOUR = "#c8c8c8"
TENSORBOARD_DPI = 100
# TensorBoard shrinks an image to its card (about 350-450 px wide), so its pictures use larger text than the reports',
# a fixed size that shrinks about twofold on a card (text still about 12 px there), and fewer ticks.
TENSORBOARD_SCALE = 1.6
TENSORBOARD_HEATMAP_INCHES = (8.0, 5.0)
TENSORBOARD_PROFILE_WIDTH = 8.0
TENSORBOARD_TICKS = (6, 9)  # at most this many step and layer ticks

# Anchor colours of matplotlib's "viridis", linearly interpolated: dark purple = low, yellow = high.
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_NAN_RGB = np.array([200, 200, 200], dtype=np.uint8)


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (the charts need it; the fallback renderers do not)."""
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------------
# Axis helpers shared with the reports
# --------------------------------------------------------------------------------------------------------------------


def tick_positions(count: int, most: int) -> list[int]:
    """At most ``most`` evenly spread indices out of ``range(count)``, always with the first and the last."""
    if count <= most:
        return list(range(count))
    step = -(-(count - 1) // max(1, most - 1))  # an even stride, so the labels read as a scale
    positions = list(range(0, count, step))
    if positions[-1] != count - 1:
        if count - 1 - positions[-1] < step / 2:
            positions.pop()
        positions.append(count - 1)
    return positions


def uniform_steps(steps: np.ndarray) -> bool:
    """Whether the probed steps are evenly spaced (then one column per probe is to scale)."""
    if len(steps) < 3:
        return True
    gaps = np.diff(np.asarray(steps, dtype=np.float64))
    return bool(np.allclose(gaps, gaps[0], rtol=0.05))


def set_step_scale(axes: "Axes", steps: Sequence[float]) -> None:
    """A symlog step axis when the probed steps span two decades or more (log-spaced early probes), else linear."""
    from matplotlib.ticker import FuncFormatter

    steps = np.asarray(steps, dtype=np.float64)
    positive = steps[steps > 0]
    if len(positive) >= 3 and positive.max() / positive.min() >= 100:
        axes.set_xscale("symlog", linthresh=max(1.0, float(positive.min())))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        low, high = float(steps.min()), float(steps.max())
        axes.set_xlim(low - 0.05 if low <= 0 else low * 0.85, high * 1.15)  # no empty negative steps


def heatmap_size(steps: int, layers: int, scale: float = 1.0) -> tuple[float, float]:
    """Figure size in inches of a layer x step heatmap: wide enough for the step labels, tall enough for the layers.

    ``scale`` > 1 enlarges the text (and the margins that hold it) relative to the plot.
    """
    width = min(14.0, max(7.0, 2.5 + 0.28 * steps)) + 2.2 * (scale - 1)
    height = min(11.0, max(3.4, 1.5 + 0.24 * layers)) + 1.6 * (scale - 1)
    return width, height


def new_figure(width: float, height: float, *, layout: str | None = "constrained") -> "Figure":
    """A bare matplotlib Figure (no pyplot, no global backend state), constrained layout unless ``layout=None``."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def grid_axes(
    figure: "Figure", rows: int, columns: int, *, left: float = 0.6, right: float = 0.2, top: float = 0.5,
    bottom: float = 0.55, wspace: float = 0.3, hspace: float = 0.55, **subplot_kw: Any,
) -> np.ndarray:
    """A ``[rows, columns]`` array of axes with margins in inches (``wspace``/``hspace``: fractions of a panel), for
    a figure made with ``layout=None``: much cheaper to draw than a layout engine on a grid of many panels."""
    width, height = figure.get_size_inches()
    return figure.subplots(
        rows, columns, squeeze=False, subplot_kw=subplot_kw or None,
        gridspec_kw={
            "left": left / width, "right": 1 - right / width, "top": 1 - top / height, "bottom": bottom / height,
            "wspace": wspace, "hspace": hspace,
        },
    )


def _axes_in_inches(figure: "Figure", left: float, bottom: float, right: float, top: float) -> "Axes":
    # Fixed margins (inches) instead of a layout engine: drawing costs about half as much, which matters because the
    # TensorBoard pictures are redrawn at every probe.
    width, height = figure.get_size_inches()
    return figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))


def to_array(figure: "Figure", dpi: int = TENSORBOARD_DPI) -> np.ndarray:
    """Render a figure to an ``[H, W, 3]`` uint8 array with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure.set_dpi(dpi)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------------------------------------------------
# matplotlib charts
# --------------------------------------------------------------------------------------------------------------------


def draw_heatmap(
    axes: "Axes",
    matrix: np.ndarray,
    steps: Sequence[int],
    layers: Sequence[int],
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    most_ticks: tuple[int, int] = (12, 17),
) -> Any:
    """Draw a ``[layers, steps]`` matrix on ``axes``: layer 0 at the bottom, one column per probe (at most
    ``most_ticks`` step and layer tick labels).

    The step axis is labelled with the probed steps; when they are unevenly spaced (log-spaced early probes) the
    axis label says the columns are not to scale. NaN cells are grey. Returns the image (for a colour bar).
    """
    import matplotlib

    steps = np.asarray(steps)
    layers = list(layers)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=NAN_COLOUR)
    image = axes.imshow(
        np.ma.masked_invalid(np.asarray(matrix, dtype=np.float64)),
        origin="lower", aspect="auto", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax,
    )
    x_ticks = tick_positions(len(steps), most_ticks[0])
    axes.set_xticks(x_ticks, [str(int(steps[i])) for i in x_ticks], rotation=45 if len(x_ticks) > 6 else 0)
    y_ticks = tick_positions(len(layers), most_ticks[1])
    axes.set_yticks(y_ticks, [str(layers[i]) for i in y_ticks])
    spacing = "" if uniform_steps(steps) else f" ({NOT_TO_SCALE})"
    axes.set_xlabel("step" + spacing)
    axes.set_ylabel("layer (0 = embeddings)")
    if title:
        axes.set_title(title)
    return image


def heatmap_figure(
    matrix: np.ndarray,
    steps: Sequence[int],
    layers: Sequence[int],
    *,
    metric: str,
    title: str | None = None,
    scale: float = 1.0,
    size: tuple[float, float] | None = None,
    most_ticks: tuple[int, int] = (12, 17),
    threshold: float | None = None,
) -> "Figure":
    """A figure with one layer x step heatmap of ``metric`` and a colour bar labelled with its values.

    ``scale``: text size relative to matplotlib's default (render the figure inside :func:`text_scale` too).
    ``size``: the figure's (width, height) in inches (default :func:`heatmap_size`; the report draws at page width).
    ``threshold``: a value marked on the colour bar (a dashed line, e.g. the bimodality coefficient's 5/9).
    """
    figure = new_figure(*(size or heatmap_size(len(steps), len(layers), scale)), layout=None)
    left, bottom, right, top = 0.75 * scale, 0.95 * scale, 1.45 * scale, 0.4 * scale
    axes = _axes_in_inches(figure, left, bottom, right, top)
    image = draw_heatmap(axes, matrix, steps, layers, title=title or metric, most_ticks=most_ticks)
    width, height = figure.get_size_inches()
    colour_left, colour_width = width - right + 0.15 * scale, 0.18 * scale
    colour_axes = figure.add_axes((colour_left / width, bottom / height, colour_width / width, 1 - (bottom + top) / height))
    colour_bar = figure.colorbar(image, cax=colour_axes)
    colour_bar.set_label(metric)
    if threshold is not None:
        colour_bar.ax.axhline(threshold, color="#d62728", lw=2.0, ls="--")
    return figure


def draw_small_heatmap(
    axes: "Axes", matrix: np.ndarray, steps: Sequence[int], layers: Sequence[int], *, title: str
) -> Any:
    """A thumbnail of a ``[layers, steps]`` heatmap for small multiples: layer 0 at the bottom, few ticks (first,
    middle and last layer; first and last step), the title in small text. Returns the image (for a colour bar)."""
    import matplotlib

    steps, layers = list(steps), list(layers)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=NAN_COLOUR)
    image = axes.imshow(
        np.ma.masked_invalid(np.asarray(matrix, dtype=np.float64)),
        origin="lower", aspect="auto", cmap=cmap, interpolation="nearest",
    )
    y_ticks = tick_positions(len(layers), 3)
    axes.set_yticks(y_ticks, [str(layers[i]) for i in y_ticks])
    x_ticks = tick_positions(len(steps), 2)
    axes.set_xticks(x_ticks, [str(int(steps[i])) for i in x_ticks])
    axes.tick_params(labelsize=7, length=2, pad=1)
    axes.set_title(title, fontsize=8.5 if len(title) <= 20 else 7.0, pad=3)
    return image


def text_scale(scale: float) -> Any:
    """A context in which matplotlib text is ``scale`` times its default size (ticks are laid out at draw time)."""
    import matplotlib

    return matplotlib.rc_context({"font.size": 10.0 * scale})


def profile_figure(
    values: np.ndarray, layers: Sequence[int], *, metric: str, step: int, scale: float = 1.0,
    width: float | None = None, threshold: float | None = None, most_ticks: int = 40,
) -> "Figure":
    """Per-layer values as bars from zero (layer 0 on the left), each bar labelled with its value (up to 24 layers);
    ``width`` in inches (default: grows with the layers); ``threshold``: a dashed horizontal line at that value (e.g.
    the bimodality coefficient's 5/9); at most ``most_ticks`` layer tick labels."""
    values = np.asarray(values, dtype=np.float64)
    layers = list(layers)
    if width is None:
        width = min(14.0, max(7.0, 2.0 + 0.42 * len(layers))) + 1.0 * (scale - 1)
    figure = new_figure(width, 4.0 + 1.0 * (scale - 1), layout=None)
    axes = _axes_in_inches(figure, 0.85 * scale, 0.6 * scale, 0.2 * scale, 0.4 * scale)
    shown = np.nan_to_num(values, nan=0.0)
    colours = ["#3182bd" if v >= 0 else "#e6550d" for v in shown]
    bars = axes.bar(np.arange(len(layers)), shown, color=colours, width=0.8)
    labels = [format_value(v) for v in values]
    vertical = len(layers) > 12
    if len(layers) <= 24:  # more labels than that overlap
        axes.bar_label(bars, labels, padding=2, fontsize="x-small" if vertical else "small", rotation=90 if vertical else 0)
    axes.axhline(0.0, color="#444444", lw=0.8)
    if threshold is not None:
        axes.axhline(threshold, color="#d62728", lw=1.5, ls="--")
        axes.annotate(format_value(threshold), (1.0, threshold), xycoords=("axes fraction", "data"), color="#d62728",
                      ha="right", va="bottom", fontsize="small")
        shown = np.append(shown, threshold)  # (keeps the line inside the y range)
    low, high = min(0.0, float(shown.min(initial=0.0))), max(0.0, float(shown.max(initial=0.0)))
    span = (high - low) or 1.0
    room = 0.25 if vertical else 0.12
    axes.set_ylim(low - (room * span if low < 0 else 0.0), high + room * span)
    axes.set_xlim(-0.6, len(layers) - 0.4)
    ticks = tick_positions(len(layers), most_ticks)
    axes.set_xticks(ticks, [str(layers[i]) for i in ticks], fontsize="small" if len(layers) > 20 else None)
    axes.set_xlabel("layer (0 = embeddings)")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} at step {step}")
    axes.grid(axis="y", alpha=0.3)
    return figure


def format_value(value: float, digits: int = 3) -> str:
    """A short label for a number: ``digits`` significant digits (``0.530``, ``2.07``, ``41.2``, ``1350``), the
    exponent form only below 1e-3 or from 1e6 on, never ``-0``; ``nan`` for NaN."""
    if not np.isfinite(value):
        return "nan"
    value = float(value)
    if value == 0.0:
        return "0"
    exponent = int(np.floor(np.log10(abs(value))))
    if -3 <= exponent < 6:
        text = f"{value:.{max(0, digits - 1 - exponent)}f}"
    else:
        text = f"{value:.{digits - 1}e}"
    if text.startswith("-") and not any(c in "123456789" for c in text.split("e")[0]):
        text = text[1:]
    return text


# --------------------------------------------------------------------------------------------------------------------
# TensorBoard images (charts with matplotlib, plain numpy pictures without)
# --------------------------------------------------------------------------------------------------------------------


def heatmap(
    matrix: np.ndarray,
    steps: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    *,
    metric: str = "",
    threshold: float | None = None,
) -> np.ndarray:
    """A ``[layers, steps]`` matrix as an ``[H, W, 3]`` uint8 image (a labelled chart when matplotlib is present,
    sized for TensorBoard's cards; ``threshold`` is marked on the colour bar)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    steps = list(range(matrix.shape[1])) if steps is None else list(steps)
    layers = list(range(matrix.shape[0])) if layers is None else list(layers)
    if not have_matplotlib():
        return plain_heatmap(matrix)
    with text_scale(TENSORBOARD_SCALE):
        figure = heatmap_figure(
            matrix, steps, layers, metric=metric or "value", title=metric or None, scale=TENSORBOARD_SCALE,
            size=TENSORBOARD_HEATMAP_INCHES, most_ticks=TENSORBOARD_TICKS, threshold=threshold,
        )
        return to_array(figure)


def depth_profile(
    values: np.ndarray, layers: Sequence[int] | None = None, *, metric: str = "", step: int = 0,
    threshold: float | None = None,
) -> np.ndarray:
    """Per-layer values as an ``[H, W, 3]`` uint8 bar chart from zero (labelled, with values, under matplotlib)."""
    values = np.asarray(values, dtype=np.float64)
    layers = list(range(len(values))) if layers is None else list(layers)
    if not have_matplotlib():
        return plain_depth_profile(values)
    with text_scale(TENSORBOARD_SCALE):
        figure = profile_figure(
            values, layers, metric=metric or "value", step=step, scale=TENSORBOARD_SCALE,
            width=TENSORBOARD_PROFILE_WIDTH, threshold=threshold, most_ticks=17,
        )
        return to_array(figure)


def colourize(values: np.ndarray) -> np.ndarray:
    """Map an array to viridis colours, scaled to its own finite min..max; NaN becomes grey."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    out = np.empty(values.shape + (3,), dtype=np.uint8)
    out[...] = _NAN_RGB
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low)
        position = np.clip(scaled, 0, 1) * (len(_VIRIDIS) - 1)
        index = np.minimum(position.astype(int), len(_VIRIDIS) - 2)
        weight = (position - index)[..., None]
        rgb = _VIRIDIS[index] * (1 - weight) + _VIRIDIS[index + 1] * weight
        out[finite] = np.round(rgb[finite]).astype(np.uint8)
    return out


def plain_heatmap(matrix: np.ndarray, *, cell_height: int = 12, max_width: int = 640) -> np.ndarray:
    """The matplotlib-free heatmap: one row per layer (layer 0 at the bottom), one column per probe, no text."""
    matrix = np.asarray(matrix, dtype=np.float64)
    layers, steps = matrix.shape
    cell_width = max(1, min(24, max_width // max(steps, 1)))
    image = colourize(matrix[::-1])  # flip so layer 0 is the bottom row
    return np.repeat(np.repeat(image, cell_height, axis=0), cell_width, axis=1)


def plain_depth_profile(values: np.ndarray, *, height: int = 120, bar_width: int = 16) -> np.ndarray:
    """The matplotlib-free depth profile: bars from zero (height = |value| / max |value|), layer 0 on the left."""
    values = np.asarray(values, dtype=np.float64)
    image = np.full((height, bar_width * len(values), 3), 255, dtype=np.uint8)
    finite = np.isfinite(values)
    if not finite.any():
        return image
    high = np.abs(values[finite]).max()
    colours = colourize(values)
    for layer, value in enumerate(values):
        x0, x1 = layer * bar_width + 1, (layer + 1) * bar_width - 1
        if not np.isfinite(value):
            image[:, x0:x1] = _NAN_RGB
            continue
        fraction = 0.0 if high <= 0 else abs(value) / high
        top = height - max(1, int(round(fraction * height)))
        image[top:, x0:x1] = colours[layer]
    return image
