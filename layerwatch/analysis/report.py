"""Pictures of a run: what ``layerwatch report RUN_DIR`` draws (the front end is ``layerwatch.cli.report``).

Reads a run directory (written during training by the monitor or after training by ``layerwatch trajectory``; the
format is the same) and writes

- ``RUN_DIR/report/overview.png``: every metric as a small layer x step heatmap with its own colour bar (the top of
  the page, beside the alerts and the best layer);
- ``RUN_DIR/report/heatmap_<metric>.png``: one layer x step heatmap per metric at the page's width (layer 0 =
  embeddings, at the bottom);
- ``RUN_DIR/report/depth_profiles.png``: each metric across depth at the first, middle and last probed steps;
- ``RUN_DIR/report/trajectories.png``: each metric over steps, one line per layer (coloured by depth);
- ``RUN_DIR/report/prompt_entropy_histograms.png``: per layer, the histogram of per-prompt prompt entropy at the
  last step, with Sarle's bimodality coefficient (above 5/9 suggests two modes);
- ``RUN_DIR/report/sinks.png``: prompt entropy with and without attention sinks beside ``massive_activation``;
- ``RUN_DIR/report.html``: one self-contained page (pictures embedded as data URIs) that opens on the overview, then
  the details and the tables of numbers (``report_page``).

Where the run recorded standard errors (``Run.stderr``), the depth profiles and trajectories carry shaded bands of
+-2 standard errors (:data:`layerwatch.analysis.html.STDERR_BAND`).

Nothing is written through links: every file is written atomically (a planted ``report.html`` link is replaced, not
followed) and a ``report/`` folder that is a link is refused. matplotlib (a dependency of layerwatch) is used with
the Agg canvas and without pyplot, so making a report never changes the plotting backend of the calling process.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from layerwatch.analysis import html as page
from layerwatch.analysis.html import (
    STDERR_BAND,
    ReportError,
    best_layers,
    check_folder,
    ordered_metrics,
    png_bytes,
    profile_steps,
    read_one_run,
    stderr_of,
    write_file,
)
from layerwatch.metrics import names, registry
from layerwatch.monitor.alerts import BIMODALITY_THRESHOLD
from layerwatch.rundir import images as images_module

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from layerwatch.rundir.runs import Run

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install matplotlib (a dependency of layerwatch that is missing here)"
IMAGE_DIR = "report"
HTML_NAME = "report.html"
BEST_LAYER_METRIC = names.PROBE_ACCURACY  # the metric whose pictures mark best_layer
_STEP_STYLES = (("#9ecae1", "o"), ("#3182bd", "s"), ("#08306b", "^"))


@dataclass
class Report:
    """What :func:`make_report` wrote."""

    html: Path
    images: dict[str, Path] = field(default_factory=dict)


def require_matplotlib() -> None:
    """Raise :class:`ReportError` with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        raise ReportError(f"layerwatch report needs matplotlib: {INSTALL_HINT}") from error


def _save(figure: "Figure", path: Path, dpi: int) -> Path:
    return write_file(path, png_bytes(figure, dpi))


# ------------------------------------------------------------------------------------------------ what to draw
def grid(count: int, columns: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``count`` panels at most ``columns`` wide."""
    columns = max(1, min(columns, count))
    return int(math.ceil(count / columns)), columns


def layer_ticks(axes: "Axes", layers: Sequence[int]) -> None:
    """Layer ticks on the x axis: every layer up to 16, else about 12 evenly spread."""
    layers = list(layers)
    axes.set_xticks([layers[i] for i in images_module.tick_positions(len(layers), 16 if len(layers) <= 16 else 12)])


# ------------------------------------------------------------------------------------------------ figures
def overview_columns(count: int) -> int:
    """Columns of the overview's small multiples (a wide grid that fits one screen)."""
    return count if count <= 4 else 3 if count <= 6 else 4 if count <= 8 else 5 if count <= 15 else 6


def plot_overview(run: "Run", metrics: Sequence[str], path: Path, *, dpi: int = 110) -> Path:
    """Every metric as a small layer x step heatmap with its own colour bar, in one figure (about 1100 x 750 px):
    the first thing the page shows. ``probe_accuracy`` marks each step's best layer with a white star."""
    rows, columns = grid(len(metrics), overview_columns(len(metrics)))
    row_height = min(2.5, 7.0 / rows)
    figure = images_module.new_figure(10.4, row_height * rows + 0.35, layout=None)
    axes_grid = images_module.grid_axes(
        figure, rows, columns, left=0.45, right=0.4, top=0.45, bottom=0.35, wspace=0.3, hspace=0.36
    )
    for panel, axes in enumerate(axes_grid.ravel()):
        if panel >= len(metrics):
            axes.set_axis_off()
            continue
        metric = metrics[panel]
        matrix = np.asarray(run.metric(metric), dtype=np.float64).T
        image = images_module.draw_small_heatmap(axes, matrix, run.steps, run.layers, title=metric)
        if metric == BEST_LAYER_METRIC:
            _mark_best_layers(axes, run, markersize=6)
        colorbar = figure.colorbar(image, ax=axes, fraction=0.08, pad=0.03)
        colorbar.ax.tick_params(labelsize=6.5, length=2, pad=1)
        colorbar.ax.yaxis.get_offset_text().set_fontsize(6.5)
        if panel % columns == 0:
            axes.set_ylabel("layer", fontsize=7.5, labelpad=1)
        if panel >= len(metrics) - columns:
            axes.set_xlabel("step", fontsize=7.5, labelpad=1)
    figure.suptitle("every metric, layer (0 = embeddings, at the bottom) x step; grey = no value", fontsize=9)
    return _save(figure, path, dpi)


def _mark_best_layers(axes: "Axes", run: "Run", *, markersize: float) -> bool:
    best = best_layers(run)
    if best is None:
        return False
    rows = {layer: row for row, layer in enumerate(run.layers)}
    points = [(column, rows[int(b)]) for column, b in enumerate(best) if np.isfinite(b) and int(b) in rows]
    if points:
        columns, layer_rows = zip(*points)
        axes.plot(columns, layer_rows, "*", color="white", markeredgecolor="black", markersize=markersize)
    return bool(points)


def plot_heatmap(run: "Run", metric: str, path: Path, *, dpi: int = 110) -> Path:
    """A layer x step heatmap of one metric at the page's width (layer 0 at the bottom, one column per probed step);
    the ``probe_accuracy`` heatmap marks each step's best layer with a white star."""
    matrix = np.asarray(run.metric(metric), dtype=np.float64).T  # [layers, steps]
    height = min(7.0, max(3.2, 1.6 + 0.16 * len(run.layers)))
    figure = images_module.heatmap_figure(
        matrix, np.asarray(run.steps), list(run.layers), metric=metric, size=(14.0, height)
    )
    if metric == BEST_LAYER_METRIC and _mark_best_layers(figure.axes[0], run, markersize=11):
        figure.axes[0].set_title(f"{metric} (star: best layer)")
    return _save(figure, path, dpi)


def _band(axes: "Axes", x: np.ndarray, values: np.ndarray, se: np.ndarray | None, colour) -> None:
    if se is None:
        return
    low, high = values - STDERR_BAND * se, values + STDERR_BAND * se
    shown = np.isfinite(low) & np.isfinite(high)
    if shown.any():
        axes.fill_between(x, low, high, where=shown, color=colour, alpha=0.18, linewidth=0, interpolate=False)


def _profile_panel(axes: "Axes", run: "Run", metric: str, chosen: Sequence[int]) -> bool:
    steps = [int(s) for s in run.steps]
    layers = np.asarray(run.layers)
    values = np.asarray(run.metric(metric), dtype=np.float64)
    se = stderr_of(run, metric)
    best = best_layers(run) if metric == BEST_LAYER_METRIC else None
    for order, step in enumerate(chosen):
        colour, marker = _STEP_STYLES[order if len(chosen) == 3 else (2 if order == len(chosen) - 1 else 0)]
        row = steps.index(step)
        axes.plot(layers, values[row], marker=marker, ms=3.5, color=colour, label=f"step {step}", lw=1.5)
        _band(axes, layers, values[row], None if se is None else se[row], colour)
        if best is not None and np.isfinite(best[row]) and int(best[row]) in run.layers:
            layer = int(best[row])
            axes.plot([layer], [values[row][list(run.layers).index(layer)]], "*", color=colour,
                      markeredgecolor="black", markersize=13)
    title = f"{metric} (star: best layer)" if best is not None else metric
    axes.set_title(title + (" \u00b1 2 se" if se is not None else ""), fontsize="medium")
    axes.set_xlabel("layer (0 = embeddings)")
    axes.grid(alpha=0.3)
    layer_ticks(axes, run.layers)
    return se is not None


def _panels(figure: "Figure", rows: int, columns: int, count: int, *, hspace: float = 0.5) -> list["Axes"]:
    """The first ``count`` axes of a grid with fixed margins (the rest removed)."""
    grid_axes = images_module.grid_axes(
        figure, rows, columns, left=0.6, right=0.2, top=0.6, bottom=0.5, wspace=0.28, hspace=hspace
    ).ravel()
    for spare in grid_axes[count:]:
        spare.remove()
    return list(grid_axes[:count])


def plot_depth_profiles(run: "Run", metrics: Sequence[str], path: Path, *, dpi: int = 110) -> Path:
    """One panel per metric: its value across depth at the first, middle and last probed steps, with shaded
    bands of +-2 standard errors where the run recorded them."""
    chosen = profile_steps(run.steps)
    rows, columns = grid(len(metrics), 4)
    figure = images_module.new_figure(3.6 * columns, 2.9 * rows + 0.45, layout=None)
    panels = _panels(figure, rows, columns, len(metrics))
    banded = False
    for panel, (metric, axes) in enumerate(zip(metrics, panels)):
        banded |= _profile_panel(axes, run, metric, chosen)
        if panel == 0:
            axes.legend(fontsize="small")
    bands = "; shaded: \u00b12 standard errors" if banded else ""
    figure.suptitle(f"depth profiles at the first, middle and last probed steps{bands}")
    return _save(figure, path, dpi)


def plot_trajectories(run: "Run", metrics: Sequence[str], path: Path, *, dpi: int = 110) -> Path:
    """One panel per metric: its value over steps, one line per layer coloured from shallow (light) to deep (dark),
    with shaded bands of +-2 standard errors where the run recorded them."""
    import matplotlib
    from matplotlib.colors import Normalize

    steps = np.asarray(run.steps, dtype=np.float64)
    layers = list(run.layers)
    rows, columns = grid(len(metrics), 4)
    figure = images_module.new_figure(3.6 * columns + 0.8, 2.9 * rows + 0.45, layout=None)
    all_axes = _panels(figure, rows, columns, len(metrics))
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    banded = False
    for metric, axes in zip(metrics, all_axes):
        values = np.asarray(run.metric(metric), dtype=np.float64)
        se = stderr_of(run, metric)
        banded |= se is not None
        for index, layer in enumerate(layers):
            colour = cmap(norm(layer))
            axes.plot(steps, values[:, index], color=colour, lw=1.1, marker="." if len(steps) < 30 else None)
            _band(axes, steps, values[:, index], None if se is None else se[:, index], colour)
        images_module.set_step_scale(axes, steps)
        axes.set_title(metric + (" \u00b1 2 se" if se is not None else ""), fontsize="medium")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    colorbar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=all_axes, shrink=0.8)
    colorbar.set_ticks([layers[i] for i in images_module.tick_positions(len(layers), 13)])
    colorbar.set_label("layer")
    bands = "; shaded: \u00b12 standard errors" if banded else ""
    figure.suptitle(f"metrics over training, one line per layer{bands}")
    return _save(figure, path, dpi)


def plot_prompt_entropy_histograms(
    run: "Run", path: Path, *, step: int | None = None, dpi: int = 110
) -> Path | None:
    """Per layer, the histogram of per-prompt prompt entropy at ``step`` (default: the last probed step).

    Each panel's title carries Sarle's bimodality coefficient; above 5/9 (red) suggests two modes. Returns ``None``
    when the run has no per-prompt values.
    """
    try:
        values = np.asarray(run.per_prompt(names.PROMPT_ENTROPY, step=step), dtype=np.float64)
    except (KeyError, ValueError) as error:
        logger.info("no per-prompt prompt entropy to plot: %s", error)
        return None
    if values.ndim != 2 or values.size == 0 or not np.isfinite(values).any():
        return None
    step = int(run.steps[-1]) if step is None else int(step)
    coefficients = bimodality_coefficients(run, step, values)
    bins = _histogram_bins(values[np.isfinite(values)])
    layers = list(run.layers)
    rows, columns = grid(len(layers), 8)
    figure = images_module.new_figure(14.0, 1.75 * rows + 0.55, layout=None)
    for index, (layer, axes) in enumerate(zip(layers, _panels(figure, rows, columns, len(layers), hspace=0.6))):
        axes.hist(values[index][np.isfinite(values[index])], bins=bins, color="#3182bd", edgecolor="white", lw=0.4)
        coefficient = coefficients[index]
        flagged = math.isfinite(coefficient) and coefficient > BIMODALITY_THRESHOLD
        text = f"layer {layer}  BC {coefficient:.2f}" if math.isfinite(coefficient) else f"layer {layer}"
        axes.set_title(text, fontsize="small", color="#c0392b" if flagged else "black", pad=2)
        axes.tick_params(labelsize="x-small")
        if index % columns == 0:
            axes.set_ylabel("prompts", fontsize="small")
        if index >= (rows - 1) * columns:
            axes.set_xlabel(names.PROMPT_ENTROPY, fontsize="small")
    figure.suptitle(
        f"per-prompt prompt entropy at step {step} (BC = bimodality coefficient; above 5/9, in red, suggests two "
        "modes)", fontsize="medium",
    )
    return _save(figure, path, dpi)


def _histogram_bins(finite: np.ndarray) -> np.ndarray:
    low, high = float(finite.min()), float(finite.max())
    if 0.0 <= low and high <= 1.0:
        low, high = 0.0, 1.0  # normalized entropy: a common, honest scale
    elif high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, 26)


def sarle_bimodality(values: np.ndarray) -> np.ndarray:
    """Sarle's bimodality coefficient of each row's finite values (bias-corrected skewness and excess kurtosis, as
    ``layerwatch.metrics.bimodality``); NaN where fewer than 4 finite values remain or all are equal."""
    result = []
    for row in np.atleast_2d(np.asarray(values, dtype=np.float64)):
        x = row[np.isfinite(row)]
        n = len(x)
        centred = x - x.mean() if n else x
        m2 = float((centred**2).mean()) if n else 0.0
        if n < 4 or m2 <= 0:
            result.append(math.nan)
            continue
        g1 = float((centred**3).mean()) / m2**1.5
        g2 = float((centred**4).mean()) / m2**2 - 3.0
        skew = math.sqrt(n * (n - 1)) / (n - 2) * g1
        kurt = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * g2 + 6)
        result.append((skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))
    return np.array(result)


def bimodality_coefficients(run: "Run", step: int, values: np.ndarray) -> list[float]:
    """Sarle's coefficient per layer: the value the monitor recorded, else computed from the per-prompt values."""
    if names.PROMPT_ENTROPY_BIMODALITY in run.metrics:
        recorded = np.asarray(run.metric(names.PROMPT_ENTROPY_BIMODALITY), dtype=np.float64)
        row = recorded[[int(s) for s in run.steps].index(step)]
        if np.isfinite(row).any():
            return [float(v) for v in row]
    return [float(v) for v in sarle_bimodality(values)]


def plot_sinks(run: "Run", path: Path, *, dpi: int = 110) -> Path | None:
    """Compression or attention sink? At the last step: prompt entropy with and without sinks across depth (left)
    beside ``massive_activation`` (right, log scale). None when the run lacks either metric."""
    if not {names.PROMPT_ENTROPY, names.MASSIVE_ACTIVATION} <= set(run.metrics):
        return None
    layers, row = np.asarray(run.layers), -1
    figure = images_module.new_figure(14.0, 3.6)
    left, right = figure.subplots(1, 2)
    for metric, style in ((names.PROMPT_ENTROPY, "-"), (names.PROMPT_ENTROPY_WITHOUT_SINKS, "--")):
        if metric in run.metrics:
            values = np.asarray(run.metric(metric), dtype=np.float64)[row]
            se = stderr_of(run, metric)
            left.plot(layers, values, style, marker="o", ms=3.5, lw=1.6, label=metric)
            _band(left, layers, values, None if se is None else se[row], left.get_lines()[-1].get_color())
    left.set_title(f"entropies at step {int(run.steps[-1])}: a gap = a sink, both low = real compression")
    left.legend(fontsize="small")
    ratio = np.asarray(run.metric(names.MASSIVE_ACTIVATION), dtype=np.float64)[row]
    right.bar(layers, np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.nan), color="#e6550d", width=0.8)
    right.set_yscale("log")
    right.set_title(f"{names.MASSIVE_ACTIVATION}: largest / median token norm (about 1-3 without a sink)")
    for axes in (left, right):
        axes.set_xlabel("layer (0 = embeddings)")
        axes.grid(alpha=0.3)
        layer_ticks(axes, run.layers)
    return _save(figure, path, dpi)


# ------------------------------------------------------------------------------------------------ the page
SINK_EXPLANATION = (
    "How to read massive_activation next to prompt_entropy (compression or attention sink?). massive_activation is "
    "a layer's largest token norm over its median token norm, per prompt. Ordinary layers sit between about 1 and 3; "
    "far above, one token (usually the first) carries a massive activation, the signature of an attention sink. Such "
    "a token dominates the mean that normalization subtracts, so every other token looks alike and prompt entropy "
    "drops even though the tokens are not compressed. prompt_entropy_without_sinks leaves out the tokens the sink "
    "rule flags (see the README). If prompt_entropy is low but the sink-free value is high, you are looking at a "
    "sink; if both are low, the layer really compresses its tokens. Where there is no sink, the two are equal."
)
BEST_LAYER_EXPLANATION = (
    "probe_accuracy is the 5-fold cross-validated accuracy of a ridge classifier of the probe's labels on each "
    "layer's mean-pooled embeddings; chance is about 1 / number of classes. best_layer is the layer with the highest "
    "accuracy, the earliest on ties, marked with a star."
)
CKA_EXPLANATION = (
    "Linear CKA between a layer's pooled embeddings now and at the previous probe (cka_to_previous) or at the run's "
    "first probe (cka_to_first): 1 means nothing moved, up to rotation and scale; lower means the layer is being "
    "reshaped. With few prompts and wide layers unrelated embeddings still score well above 0 (about D / (M + D)), "
    "so compare layers and steps with each other rather than with 0. cka_to_previous has no value at the first probe."
)
METRIC_NOTES = {
    names.PROBE_ACCURACY: BEST_LAYER_EXPLANATION,
    names.CKA_TO_PREVIOUS: CKA_EXPLANATION,
    names.CKA_TO_FIRST: CKA_EXPLANATION,
}
REPORT_CSS = """
.top { display: grid; grid-template-columns: minmax(0, 1fr) 360px; gap: 0.8em; align-items: start; }
img.overview { width: 100%; max-height: calc(100vh - 5.5em); object-fit: contain; object-position: left top; }
.top .alerts { max-height: 34vh; overflow-y: auto; margin: 0.2em 0; padding-left: 1.2em; font-size: 0.9em; }
@media (max-width: 1100px) { .top { grid-template-columns: 1fr; } }
"""


def best_layer_summary(run: "Run") -> str:
    """One paragraph on the best layer: where it is at the last step (with its accuracy) and how it moved."""
    best = best_layers(run)
    if best is None or not np.isfinite(best).any():
        return (f"Not measured: {names.BEST_LAYER} needs {names.PROBE_ACCURACY}, which needs a probe with class "
                "labels.")
    steps = [int(s) for s in run.steps]
    last = int(np.flatnonzero(np.isfinite(best))[-1])
    layer = int(best[last])
    text = f"<b>layer {layer}</b> at step {steps[last]}"
    if names.PROBE_ACCURACY in run.metrics and layer in run.layers:
        accuracy = run.metric(names.PROBE_ACCURACY)[last, list(run.layers).index(layer)]
        text += f" ({names.PROBE_ACCURACY} {page.fmt(accuracy)})"
    spans: list[list[int]] = []  # [layer, first step, last step] runs of equal best layers
    for step, value in zip(steps, best):
        if not np.isfinite(value):
            continue
        if spans and spans[-1][0] == int(value):
            spans[-1][2] = step
        else:
            spans.append([int(value), step, step])
    if len(spans) > 1:
        moves = "; ".join(f"layer {b} at steps {a}\u2013{c}" if a != c else f"layer {b} at step {a}"
                          for b, a, c in spans[-6:])
        text += f". Over training: {moves}."
    return text + " Marked with a star on the probe_accuracy pictures."


def _alert_line(step: int, text: str) -> str:
    return text if f"step {step}" in text else f"step {step}: {text}"


def _aside(run: "Run", drawn: dict[str, Path], metrics: Sequence[str]) -> list[str]:
    esc = page.escape
    alerts = [_alert_line(record.step, page.alert_text(a)) for record in run.records for a in record.alerts]
    parts = ["<aside>", f'<div class="box"><h2 id="alerts">Alerts ({len(alerts)})</h2>']
    if alerts:
        parts.append('<ul class="alerts">' + "".join(f"<li>{esc(a)}</li>" for a in alerts) + "</ul>")
    else:
        parts.append(f'<p class="note">No alerts (checked at {len(run.steps)} probe(s)).</p>')
    parts.append(f'</div><div class="box"><h2>Best layer</h2><p>{best_layer_summary(run)}</p></div>')
    links = [("heatmaps", "heatmaps"), ("profiles", "depth profiles"), ("trajectories", "trajectories")]
    links += [("cka", "which layers are changing")] if names.CKA_TO_FIRST in metrics else []
    links += [("best-layer", "best layer")] if names.BEST_LAYER in drawn else []
    links += [(key, text) for key, text in (("histograms", "prompt entropy histograms"),
                                            ("sinks", "compression or sink?")) if key in drawn or
              (key == "histograms" and "prompt_entropy_histograms" in drawn)]
    links.append(("numbers", "numbers"))
    parts.append('<div class="box"><h2>Contents</h2>' + page.nav(links))
    parts.append(page.nav([(f"metric-{m}", m) for m in metrics]) + "</div>")
    if "prompt_entropy_histograms" not in drawn:
        parts.append('<p class="note">This run has no per-prompt prompt entropy values, so no histograms.</p>')
    settings = run.records[-1].settings if run.records else {}
    parts.append('<details class="box"><summary>Settings</summary>')
    parts.append(page.settings_table(["value"], [settings]) + "</details></aside>")
    return parts


def _header(run: "Run", run_dir: Path) -> list[str]:
    steps = [int(s) for s in run.steps]
    return [
        "<h1>layerwatch report</h1>",
        f'<p class="meta">Run <code>{page.escape(str(run_dir))}</code>: {len(steps)} probed step(s) ({steps[0]} to '
        f"{steps[-1]}), layers {run.layers[0]} to {run.layers[-1]} (0 = embeddings). {page.generated()}</p>",
    ]


def _picture(drawn: dict[str, Path], key: str, alt: str, css: str = "wide") -> str:
    return page.image_tag(page.data_uri(drawn[key]), alt, css=css) if key in drawn else ""


def _heatmap_sections(drawn: dict[str, Path], metrics: Sequence[str]) -> list[str]:
    esc, parts = page.escape, []
    for metric in metrics:
        note = registry.describe(metric) if metric in registry.all_metrics() else ""
        extra = "" if metric in (names.CKA_TO_PREVIOUS, names.CKA_TO_FIRST) else METRIC_NOTES.get(metric, "")
        parts.append(f'<h3 id="metric-{esc(metric)}">{esc(metric)}</h3><p class="note">{esc(note)} {esc(extra)}</p>')
        parts.append(_picture(drawn, f"heatmap_{metric}", f"{metric}: layer x step heatmap"))
    return parts


def _best_layer_section(run: "Run", drawn: dict[str, Path]) -> list[str]:
    best = best_layers(run)
    if best is None or names.BEST_LAYER not in drawn:
        return []
    cells = "".join(f"<tr><th>{int(step)}</th><td>{page.DASH if not np.isfinite(b) else int(b)}</td></tr>"
                    for step, b in zip(run.steps, best))
    return [
        f'<h2 id="best-layer">Best layer</h2><p class="note">{page.escape(BEST_LAYER_EXPLANATION)}</p>',
        _picture(drawn, names.BEST_LAYER, f"{names.BEST_LAYER} over training", css=""),
        '<details><summary>best layer per step</summary><table class="numbers"><thead><tr><th>step</th>'
        f"<th>best layer</th></tr></thead>{cells}</table></details>",
    ]


def plot_best_layer(run: "Run", path: Path, *, dpi: int = 110) -> Path | None:
    """The best layer over training (a step line), None when the run has no ``best_layer``."""
    best = best_layers(run)
    if best is None or not np.isfinite(best).any():
        return None
    figure = images_module.new_figure(7.0, 2.6)
    axes = figure.add_subplot()
    axes.plot(np.asarray(run.steps), best, drawstyle="steps-post", marker="*", ms=9, color="#08306b")
    images_module.set_step_scale(axes, run.steps)
    axes.set_ylim(min(run.layers) - 0.5, max(run.layers) + 0.5)
    axes.set_xlabel("step")
    axes.set_ylabel("best layer")
    axes.set_title(f"{names.BEST_LAYER}: the layer with the highest {names.PROBE_ACCURACY}")
    axes.grid(alpha=0.3)
    return _save(figure, path, dpi)


def _details(run: "Run", drawn: dict[str, Path], metrics: Sequence[str]) -> list[str]:
    esc = page.escape
    banded = any(stderr_of(run, m) is not None for m in metrics)
    bands = (" Shaded bands: \u00b12 standard errors (about a 95% interval) recorded with each probe."
             if banded else " The run recorded no standard errors, so there are no bands.")
    cka = [m for m in metrics if m in (names.CKA_TO_PREVIOUS, names.CKA_TO_FIRST)]
    parts = ['<h2 id="heatmaps">Layer x step heatmaps</h2>']
    parts += _heatmap_sections(drawn, [m for m in metrics if m not in cka])
    if cka:
        parts.append(f'<h2 id="cka">Which layers are changing</h2><p class="note">{esc(CKA_EXPLANATION)}</p>')
        parts += _heatmap_sections(drawn, cka)
    parts += _best_layer_section(run, drawn)
    parts.append(f'<h2 id="profiles">Depth profiles</h2><p class="note">Each metric across depth at the first, '
                 f"middle and last probed steps.{bands}</p>")
    parts.append(_picture(drawn, "depth_profiles", "depth profiles at the first, middle and last steps"))
    parts.append(f'<h2 id="trajectories">Trajectories</h2><p class="note">Each metric over training, one line per '
                 f"layer, light (shallow) to dark (deep).{bands}</p>")
    parts.append(_picture(drawn, "trajectories", "metrics over steps, one line per layer"))
    if "prompt_entropy_histograms" in drawn:
        parts.append('<h2 id="histograms">Per-prompt prompt entropy</h2><p class="note">Histograms at the last '
                     "probed step. The papers found two modes in some intermediate layers of trained Transformers "
                     "(bimodality coefficient above 5/9, in red).</p>")
        parts.append(_picture(drawn, "prompt_entropy_histograms", "per-layer histograms of per-prompt entropy"))
    if "sinks" in drawn:
        parts.append(f'<h2 id="sinks">Compression or attention sink?</h2><p class="note">{esc(SINK_EXPLANATION)}</p>')
        parts.append(_picture(drawn, "sinks", "prompt entropy with and without sinks beside massive_activation"))
    return parts


def table_steps(steps: Sequence[int], most: int = 12) -> list[int]:
    """The steps shown in the tables: all of them, or ``most`` evenly spread ones including the first and last."""
    steps = [int(s) for s in steps]
    return [steps[i] for i in images_module.tick_positions(len(steps), most)]


def metric_table(run: "Run", metric: str) -> str:
    """A metric's values, one row per layer and one column per shown step, then ``last - first``."""
    steps = [int(s) for s in run.steps]
    shown = table_steps(steps)
    values = np.asarray(run.metric(metric), dtype=np.float64)
    scale = page.scale_of(values)
    head = "".join(f"<th>{s}</th>" for s in shown)
    change_head = "<th>last &minus; first</th>" if len(steps) > 1 else ""
    lines = [f'<div class="scroll"><table class="numbers"><thead><tr><th>layer \\ step</th>{head}{change_head}'
             "</tr></thead><tbody>"]
    for index, layer in enumerate(run.layers):
        cells = "".join(page.cell(values[steps.index(s), index], scale=scale) for s in shown)
        if len(steps) > 1:
            cells += page.cell(values[-1, index] - values[0, index], scale=scale)
        lines.append(f"<tr><th>{layer}</th>{cells}</tr>")
    lines.append("</tbody></table></div>")
    if len(shown) < len(steps):
        lines.append(f'<p class="note">{len(shown)} of {len(steps)} steps shown.</p>')
    return "\n".join(lines)


def render_html(run: "Run", run_dir: Path, drawn: dict[str, Path], metrics: Sequence[str]) -> str:
    """The report page: the overview (small multiples, alerts, best layer) on the first screen, then the pictures
    at the page's width, then one table of numbers per metric (folded)."""
    parts = page.page_head(f"layerwatch report: {run_dir}", extra_css=REPORT_CSS)
    parts += _header(run, run_dir)
    parts.append('<div class="top"><div>')
    parts.append(_picture(drawn, "overview", "every metric as a small layer x step heatmap", css="overview"))
    parts.append("</div>")
    parts += _aside(run, drawn, metrics)
    parts.append("</div>")
    parts += _details(run, drawn, metrics)
    parts.append('<h2 id="numbers">Numbers</h2><p class="note">Significant digits: 3; a value below a '
                 "ten-thousandth of its table's largest reads as 0. Click a metric to open its table.</p>")
    for metric in metrics:
        parts.append(f"<details><summary>{page.escape(metric)}</summary>{metric_table(run, metric)}</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ entry point
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")


def image_path(image_dir: Path, key: str, taken: Iterable[Path] = ()) -> Path:
    """The PNG path of picture ``key`` inside ``image_dir``.

    Metric names come from the run's data, so they never choose a path: the file name is ``key`` reduced to
    letters, digits, ``_`` and ``-`` (a suffix keeps two names apart). The file is written atomically, so a link
    planted at that name is replaced, not followed.
    """
    slug = _UNSAFE_NAME_CHARACTERS.sub("_", key).strip("_")[:100] or "metric"
    taken_names = {p.name for p in taken}
    path, count = image_dir / f"{slug}.png", 1
    while path.name in taken_names:
        count += 1
        path = image_dir / f"{slug}_{count}.png"
    return path


def choose_metrics(run: "Run", metrics: str | Sequence[str] | None) -> list[str]:
    """The metrics to draw: all the run has (``None``), a preset's that the run has (a preset name), or exactly
    ``metrics`` (each must be in the run)."""
    available = ordered_metrics(run)
    if isinstance(metrics, str) and metrics in registry.PRESETS:
        wanted = set(registry.resolve_metrics(metrics)[1])
        return [m for m in available if m in wanted]
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not metrics:
        return available
    unknown = [m for m in metrics if m not in run.metrics]
    if unknown:
        raise ReportError(f"the run has no metric {', '.join(unknown)}; it has {', '.join(run.metrics)}")
    return list(dict.fromkeys(metrics))


def draw_all(run: "Run", chosen: Sequence[str], image_dir: Path, dpi: int) -> dict[str, Path]:
    """Every picture of the report, keyed ``overview``, ``heatmap_<metric>``, ``depth_profiles``, ..."""
    drawn: dict[str, Path] = {"overview": plot_overview(run, chosen, image_path(image_dir, "overview"), dpi=dpi)}
    for metric in chosen:
        key = f"heatmap_{metric}"
        drawn[key] = plot_heatmap(run, metric, image_path(image_dir, key, drawn.values()), dpi=dpi)
    drawn["depth_profiles"] = plot_depth_profiles(run, chosen, image_path(image_dir, "depth_profiles"), dpi=dpi)
    drawn["trajectories"] = plot_trajectories(run, chosen, image_path(image_dir, "trajectories"), dpi=dpi)
    optional = {
        "prompt_entropy_histograms": lambda path: plot_prompt_entropy_histograms(run, path, dpi=dpi),
        "sinks": lambda path: plot_sinks(run, path, dpi=dpi) if names.MASSIVE_ACTIVATION in chosen else None,
        names.BEST_LAYER: lambda path: plot_best_layer(run, path, dpi=dpi) if BEST_LAYER_METRIC in chosen else None,
    }
    for key, draw in optional.items():
        picture = draw(image_path(image_dir, key, drawn.values()))
        if picture is not None:
            drawn[key] = picture
    return drawn


def make_report(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    dpi: int = 110,
) -> Report:
    """Write the PNG pictures and the HTML page of the run in ``run_dir``.

    Args:
        run_dir: a layerwatch run directory (holding ``layerwatch.jsonl``).
        out: where ``report.html`` and the ``report/`` image folder go (default: ``run_dir``).
        metrics: the metrics to draw: a list of names, or a preset name (default: every metric the run has, minus
            all-NaN ones).
        dpi: image resolution.

    Raises:
        ReportError: no run in ``run_dir``, an unknown metric, matplotlib missing, or a ``report/`` folder that is
            a symbolic link.
    """
    require_matplotlib()
    run_dir = Path(run_dir)
    run = read_one_run(run_dir)
    chosen = choose_metrics(run, metrics)
    if not chosen:
        raise ReportError(f"the run in {run_dir} has no finite metric values to draw")
    out_dir = Path(out) if out is not None else run_dir
    image_dir = out_dir / IMAGE_DIR
    check_folder(image_dir, out_dir)
    drawn = draw_all(run, chosen, image_dir, dpi)
    html_file = write_file(out_dir / HTML_NAME, render_html(run, run_dir, drawn, chosen))
    return Report(html=html_file, images=drawn)


__all__ = [
    "Report", "ReportError", "make_report", "ordered_metrics", "best_layers", "stderr_of", "profile_steps",
    "plot_overview", "plot_heatmap", "plot_depth_profiles", "plot_trajectories", "plot_prompt_entropy_histograms",
    "plot_sinks", "image_path", "choose_metrics", "IMAGE_DIR", "HTML_NAME",
]
