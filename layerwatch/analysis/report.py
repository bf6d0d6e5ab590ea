"""Pictures of a run: ``layerwatch report RUN_DIR``.

Reads a run directory (written during training by the monitor or after training by ``layerwatch trajectory``; the
format is the same) and writes

- ``RUN_DIR/report/heatmap_<metric>.png``: a layer x step heatmap per metric (layer 0 = embeddings, at the bottom);
- ``RUN_DIR/report/depth_profiles.png``: each metric across depth at the first, middle and last probed steps;
- ``RUN_DIR/report/trajectories.png``: each metric over steps, one line per layer (coloured by depth);
- ``RUN_DIR/report/prompt_entropy_histograms.png``: per layer, the histogram of per-prompt prompt entropy at the
  last step, with Sarle's bimodality coefficient (above 5/9 suggests two modes);
- ``RUN_DIR/report.html``: one self-contained page (images embedded as data URIs) with the pictures and tables of
  the numbers.

matplotlib (a dependency of layerwatch) is imported only here, with the Agg canvas and without
pyplot, so making a report never changes the plotting backend of the calling process.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import logging
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layerwatch.rundir import images as images_module
from layerwatch.metrics import registry
from layerwatch.monitor.alerts import BIMODALITY_THRESHOLD

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from layerwatch.rundir.runs import Run

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install matplotlib (a dependency of layerwatch that is missing here)"
IMAGE_DIR = "report"
HTML_NAME = "report.html"

class ReportError(Exception):
    """A problem the user can fix (no run, matplotlib missing); the CLI prints it and exits 2."""


@dataclass
class Report:
    """What :func:`make_report` wrote."""

    html: Path
    images: dict[str, Path] = field(default_factory=dict)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        raise ReportError(f"layerwatch report needs matplotlib: {INSTALL_HINT}") from error


_new_figure = images_module.new_figure
_tick_positions = images_module.tick_positions


def _save(figure: "Figure", path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    return path


def ordered_metrics(run: "Run") -> list[str]:
    """The run's metrics in display order, leaving out all-NaN ones and an all-zero ``nonfinite``."""
    order = registry.all_metrics()  # registry order; metrics it does not know (an older run) come after
    names = [m for m in order if m in run.metrics] + [m for m in run.metrics if m not in order]
    kept = []
    for name in names:
        values = np.asarray(run.metric(name), dtype=np.float64)
        if not np.isfinite(values).any():
            continue
        if name == "nonfinite" and not np.nan_to_num(values).any():
            continue
        kept.append(name)
    return kept


BEST_LAYER_METRIC = "probe_accuracy"  # the metric whose pictures mark best_layer


def best_layers(run: "Run") -> np.ndarray | None:
    """``[steps]`` best layer per probed step (NaN where unknown), or None when the run has no ``best_layer``."""
    return run.scalar("best_layer") if "best_layer" in getattr(run, "scalars", ()) else None


def plot_heatmap(run: "Run", metric: str, path: Path, *, dpi: int = 110) -> Path:
    """A layer x step heatmap of one metric (layer 0 at the bottom, one column per probed step); the
    ``probe_accuracy`` heatmap marks each step's best layer with a white star."""
    matrix = np.asarray(run.metric(metric), dtype=np.float64).T  # [layers, steps]
    figure = images_module.heatmap_figure(matrix, np.asarray(run.steps), list(run.layers), metric=metric)
    best = best_layers(run) if metric == BEST_LAYER_METRIC else None
    if best is not None:
        rows = {layer: row for row, layer in enumerate(run.layers)}
        points = [(column, rows[int(b)]) for column, b in enumerate(best) if np.isfinite(b) and int(b) in rows]
        if points:
            columns, layer_rows = zip(*points)
            figure.axes[0].plot(columns, layer_rows, "*", color="white", markeredgecolor="black", markersize=11)
            figure.axes[0].set_title(f"{metric} (star: best layer)")
    return _save(figure, path, dpi)


def profile_steps(steps: Sequence[int]) -> list[int]:
    """The first, middle and last probed steps (without repeats)."""
    steps = [int(s) for s in steps]
    if not steps:
        return []
    chosen = [steps[0], steps[len(steps) // 2], steps[-1]]
    return list(dict.fromkeys(chosen))


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return int(math.ceil(count / columns)), columns


def plot_depth_profiles(run: "Run", metrics: Sequence[str], path: Path, *, dpi: int = 110) -> Path:
    """One panel per metric: its value across depth at the first, middle and last probed steps."""
    steps = [int(s) for s in run.steps]
    chosen = profile_steps(steps)
    rows, columns = _grid(len(metrics), 3)
    figure = _new_figure(4.2 * columns, 3.1 * rows)
    layers = np.asarray(run.layers)
    styles = {0: ("#9ecae1", "o"), 1: ("#3182bd", "s"), 2: ("#08306b", "^")}
    for panel, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, panel + 1)
        values = np.asarray(run.metric(metric), dtype=np.float64)
        for order, step in enumerate(chosen):
            colour, marker = styles[order if len(chosen) == 3 else (2 if order == len(chosen) - 1 else 0)]
            axes.plot(layers, values[steps.index(step)], marker=marker, color=colour, label=f"step {step}", lw=1.6)
            best = best_layers(run) if metric == BEST_LAYER_METRIC else None
            if best is not None and np.isfinite(best[steps.index(step)]):
                layer = int(best[steps.index(step)])
                row = values[steps.index(step)][list(run.layers).index(layer)] if layer in run.layers else np.nan
                axes.plot([layer], [row], "*", color=colour, markeredgecolor="black", markersize=14)
        if metric == BEST_LAYER_METRIC and best_layers(run) is not None:
            metric = f"{metric} (star: best layer)"
        axes.set_title(metric)
        axes.set_xlabel("layer (0 = embeddings)")
        axes.grid(alpha=0.3)
        if len(layers) <= 16:
            axes.set_xticks(layers)
        if panel == 0:
            axes.legend(fontsize="small")
    figure.suptitle("depth profiles at the first, middle and last probed steps")
    return _save(figure, path, dpi)


def plot_trajectories(run: "Run", metrics: Sequence[str], path: Path, *, dpi: int = 110) -> Path:
    """One panel per metric: its value over steps, one line per layer coloured from shallow (light) to deep (dark)."""
    import matplotlib
    from matplotlib.colors import Normalize

    steps = np.asarray(run.steps, dtype=np.float64)
    layers = list(run.layers)
    rows, columns = _grid(len(metrics), 3)
    figure = _new_figure(4.2 * columns + 0.8, 3.1 * rows)
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    all_axes = []
    for panel, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, panel + 1)
        all_axes.append(axes)
        values = np.asarray(run.metric(metric), dtype=np.float64)
        for index, layer in enumerate(layers):
            axes.plot(steps, values[:, index], color=cmap(norm(layer)), lw=1.2, marker="." if len(steps) < 30 else None)
        images_module.set_step_scale(axes, steps)
        axes.set_title(metric)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    colorbar = figure.colorbar(mappable, ax=all_axes, shrink=0.8)
    colorbar.set_ticks([layers[i] for i in _tick_positions(len(layers), 13)])
    colorbar.set_label("layer")
    figure.suptitle("metrics over training, one line per layer")
    return _save(figure, path, dpi)


def plot_prompt_entropy_histograms(
    run: "Run", path: Path, *, step: int | None = None, dpi: int = 110
) -> Path | None:
    """Per layer, the histogram of per-prompt prompt entropy at ``step`` (default: the last probed step).

    Each panel's title carries Sarle's bimodality coefficient; above 5/9 (red) suggests two modes. Returns ``None``
    when the run has no per-prompt values.
    """
    try:
        values = np.asarray(run.per_prompt("prompt_entropy", step=step), dtype=np.float64)
    except (KeyError, ValueError) as error:
        logger.info("no per-prompt prompt entropy to plot: %s", error)
        return None
    if values.ndim != 2 or values.size == 0 or not np.isfinite(values).any():
        return None
    step = int(run.steps[-1]) if step is None else int(step)
    layers = list(run.layers)
    coefficients = _bimodality(run, step, values)
    finite = values[np.isfinite(values)]
    low, high = float(finite.min()), float(finite.max())
    if 0.0 <= low and high <= 1.0:
        low, high = 0.0, 1.0  # normalized entropy: a common, honest scale
    elif high <= low:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 26)
    rows, columns = _grid(len(layers), 6 if len(layers) > 12 else 4)
    figure = _new_figure(2.6 * columns, 2.1 * rows)
    for index, layer in enumerate(layers):
        axes = figure.add_subplot(rows, columns, index + 1)
        row = values[index][np.isfinite(values[index])]
        axes.hist(row, bins=bins, color="#3182bd", edgecolor="white", linewidth=0.4)
        coefficient = coefficients[index]
        flagged = math.isfinite(coefficient) and coefficient > BIMODALITY_THRESHOLD
        text = f"layer {layer}  BC {coefficient:.2f}" if math.isfinite(coefficient) else f"layer {layer}"
        axes.set_title(text, fontsize="small", color="#c0392b" if flagged else "black")
        axes.tick_params(labelsize="x-small")
        if index % columns == 0:
            axes.set_ylabel("prompts", fontsize="small")
        if index >= (rows - 1) * columns:
            axes.set_xlabel("prompt entropy", fontsize="small")
    figure.suptitle(
        f"per-prompt prompt entropy at step {step} (BC = bimodality coefficient; > 5/9 in red suggests two modes)"
    )
    return _save(figure, path, dpi)


def _bimodality(run: "Run", step: int, values: np.ndarray) -> list[float]:
    """Sarle's coefficient per layer: the value the monitor recorded, else layerwatch.metrics.bimodality."""
    if "prompt_entropy_bimodality" in run.metrics:
        recorded = np.asarray(run.metric("prompt_entropy_bimodality"), dtype=np.float64)
        row = recorded[[int(s) for s in run.steps].index(step)]
        if np.isfinite(row).any():
            return [float(v) for v in row]
    try:
        import torch

        from layerwatch.metrics import bimodality

        result = bimodality(torch.as_tensor(values, dtype=torch.float64), dim=-1)
        return [float(v) for v in result.reshape(-1)]
    except Exception as error:  # noqa: BLE001 - a missing coefficient must not cost the whole report
        logger.warning("bimodality coefficient unavailable: %s", error)
        return [math.nan] * values.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------------


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _cell(value: float) -> str:
    if not math.isfinite(value):
        return "&ndash;"
    if value != 0 and (abs(value) >= 1000 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4f}"


def table_steps(steps: Sequence[int], most: int = 12) -> list[int]:
    """The steps shown in the tables: all of them, or ``most`` evenly spread ones including the first and last."""
    steps = [int(s) for s in steps]
    return [steps[i] for i in _tick_positions(len(steps), most)]


def _metric_table(run: "Run", metric: str) -> str:
    steps = [int(s) for s in run.steps]
    shown = table_steps(steps)
    values = np.asarray(run.metric(metric), dtype=np.float64)
    head = "".join(f"<th>{s}</th>" for s in shown)
    change_head = "<th>last &minus; first</th>" if len(steps) > 1 else ""
    lines = [f'<table class="numbers"><thead><tr><th>layer \\ step</th>{head}{change_head}</tr></thead><tbody>']
    for index, layer in enumerate(run.layers):
        cells = "".join(f"<td>{_cell(values[steps.index(s), index])}</td>" for s in shown)
        if len(steps) > 1:
            cells += f"<td>{_cell(values[-1, index] - values[0, index])}</td>"
        lines.append(f"<tr><th>{layer}</th>{cells}</tr>")
    lines.append("</tbody></table>")
    if len(shown) < len(steps):
        lines.append(f'<p class="note">{len(shown)} of {len(steps)} steps shown.</p>')
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .note { color: #666; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
table.numbers { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
table.numbers th, table.numbers td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
table.numbers thead th { background: #f3f3f3; }
.alerts li { color: #a33; }
nav a { margin-right: 1em; }
"""


def render_html(run: "Run", run_dir: Path, images: dict[str, Path], metrics: Sequence[str]) -> str:
    """The report page: run facts, alerts, every picture inline, and one table of numbers per metric."""
    steps = [int(s) for s in run.steps]
    settings = run.records[-1].settings if run.records else {}
    alerts = [f"step {record.step}: {alert}" for record in run.records for alert in record.alerts]
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>layerwatch report: {esc(str(run_dir))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>layerwatch report</h1>",
        f'<p class="meta">Run <code>{esc(str(run_dir))}</code>: {len(steps)} probed step(s) '
        f"({steps[0]} to {steps[-1]}), layers {run.layers[0]} to {run.layers[-1]} (0 = embeddings). "
        f"Generated {esc(datetime.datetime.now().strftime('%Y-%m-%d %H:%M'))}.</p>",
        '<nav><a href="#heatmaps">heatmaps</a><a href="#profiles">depth profiles</a>'
        '<a href="#trajectories">trajectories</a><a href="#histograms">prompt entropy histograms</a>'
        '<a href="#numbers">numbers</a></nav>',
    ]
    if settings:
        def value(v: Any) -> str:
            return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

        shown = "; ".join(f"{esc(str(k))} = {esc(value(v))}" for k, v in sorted(settings.items()))
        parts.append(f'<p class="meta">Settings: {shown}</p>')
    if alerts:
        parts.append("<h2>Alerts</h2><ul class=\"alerts\">")
        parts.extend(f"<li>{esc(a)}</li>" for a in alerts)
        parts.append("</ul>")

    def image(key: str, alt: str) -> None:
        path = images.get(key)
        if path is not None:
            parts.append(f'<p><img src="{_data_uri(path)}" alt="{esc(alt)}"></p>')

    parts.append('<h2 id="heatmaps">Layer x step heatmaps</h2>')
    for metric in metrics:
        parts.append(f"<h3>{esc(metric)}</h3><p class=\"note\">{esc(registry.describe(metric))}</p>")
        image(f"heatmap_{metric}", f"{metric}: layer x step heatmap")
    parts.append('<h2 id="profiles">Depth profiles</h2>')
    image("depth_profiles", "depth profiles at the first, middle and last steps")
    parts.append('<h2 id="trajectories">Trajectories</h2>')
    image("trajectories", "metrics over steps, one line per layer")
    parts.append('<h2 id="histograms">Per-prompt prompt entropy</h2>')
    if "prompt_entropy_histograms" in images:
        parts.append(
            '<p class="note">Histograms at the last probed step. The papers found two modes in some intermediate '
            "layers of trained Transformers (bimodality coefficient above 5/9).</p>"
        )
        image("prompt_entropy_histograms", "per-layer histograms of per-prompt prompt entropy")
    else:
        parts.append('<p class="note">This run has no per-prompt prompt entropy values.</p>')
    parts.extend(_beyond_sections(run, metrics))
    parts.append('<h2 id="numbers">Numbers</h2>')
    for metric in metrics:
        parts.append(f"<h3>{esc(metric)}</h3>")
        parts.append(_metric_table(run, metric))
    parts.append("</body></html>")
    return "\n".join(parts)


SINK_EXPLANATION = (
    "How to read massive_activation next to prompt_entropy (compression or attention sink?). massive_activation is a "
    "layer's largest token norm over its median token norm, per prompt. Ordinary layers sit between about 1 and 3. "
    "Far above 10, one token (usually the first) carries a massive activation, the signature of an attention sink. "
    "Such a token dominates the mean that normalization subtracts, so every other token looks alike and prompt "
    "entropy drops to near zero even though the tokens are not compressed. prompt_entropy_without_sinks leaves out "
    "tokens above 10 times their prompt's median norm. If prompt_entropy is low but the sink-free value is high, you "
    "are looking at a sink. If both are low, the layer really compresses its tokens. Where there is no sink, the two "
    "entropies are equal."
)
BEST_LAYER_EXPLANATION = (
    "probe_accuracy is the 5-fold cross-validated accuracy of a ridge classifier of the probe's labels on each "
    "layer's mean-pooled embeddings; chance is about 1 / number of classes. best_layer is the layer with the highest "
    "accuracy, the earliest on ties. It is marked with a star on the probe_accuracy heatmap and depth profile."
)
CKA_EXPLANATION = (
    "cka_to_previous and cka_to_first are linear CKA between a layer's pooled embeddings now and at the previous "
    "probe, or at the run's first probe. 1 means nothing moved, up to rotation and scale; lower means the layer is "
    "being reshaped. With few prompts and wide layers, unrelated embeddings still score well above 0 (about D / (M + D) "
    "for random ones), so compare layers and steps with each other rather than with 0."
)


def _beyond_sections(run: "Run", metrics: Sequence[str]) -> list[str]:
    """The explanations (and best-layer table) of the SPEC §7 metrics the report shows."""
    esc = html.escape
    parts: list[str] = []
    best = best_layers(run)
    if BEST_LAYER_METRIC in metrics and best is not None:
        parts.append(f'<h2 id="best-layer">Best layer</h2><p class="note">{esc(BEST_LAYER_EXPLANATION)}</p>')
        cells = "".join(
            f"<tr><th>{int(step)}</th><td>{'nan' if not np.isfinite(b) else int(b)}</td></tr>"
            for step, b in zip(run.steps, best)
        )
        parts.append(f'<table class="numbers"><thead><tr><th>step</th><th>best layer</th></tr></thead>{cells}</table>')
    if "cka_to_previous" in metrics or "cka_to_first" in metrics:
        parts.append(f'<h2 id="cka">Which layers are changing</h2><p class="note">{esc(CKA_EXPLANATION)}</p>')
    if "massive_activation" in metrics:
        parts.append(f'<h2 id="sinks">Compression or attention sink?</h2><p class="note">{esc(SINK_EXPLANATION)}</p>')
    return parts


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


def make_report(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    dpi: int = 110,
) -> Report:
    """Write the PNG pictures and the HTML page of the run in ``run_dir``.

    Args:
        run_dir: a layerwatch run directory (holding ``layerwatch.jsonl``).
        out: where ``report.html`` and the ``report/`` image folder go (default: ``run_dir``).
        metrics: the metrics to draw (default: every metric the run has, minus all-NaN ones).
        dpi: image resolution.

    Raises:
        ReportError: no run in ``run_dir``, an unknown metric, or matplotlib missing.
    """
    _require_matplotlib()
    run_dir = Path(run_dir)
    run = _read(run_dir)
    names = ordered_metrics(run)
    if metrics:
        unknown = [m for m in metrics if m not in run.metrics]
        if unknown:
            raise ReportError(
                f"the run has no metric {', '.join(unknown)}; it has {', '.join(run.metrics)}"
            )
        names = list(metrics)
    if not names:
        raise ReportError(f"the run in {run_dir} has no finite metric values to draw")
    out_dir = Path(out) if out is not None else run_dir
    image_dir = out_dir / IMAGE_DIR
    images: dict[str, Path] = {}
    for metric in names:
        key = f"heatmap_{metric}"
        images[key] = plot_heatmap(run, metric, image_path(image_dir, key, images.values()), dpi=dpi)
    images["depth_profiles"] = plot_depth_profiles(run, names, image_path(image_dir, "depth_profiles"), dpi=dpi)
    images["trajectories"] = plot_trajectories(run, names, image_path(image_dir, "trajectories"), dpi=dpi)
    histograms = plot_prompt_entropy_histograms(run, image_path(image_dir, "prompt_entropy_histograms"), dpi=dpi)
    if histograms is not None:
        images["prompt_entropy_histograms"] = histograms
    page = out_dir / HTML_NAME
    page.write_text(render_html(run, run_dir, images, names), encoding="utf-8")
    return Report(html=page, images=images)


_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")


def image_path(image_dir: Path, key: str, taken: Iterable[Path] = ()) -> Path:
    """The PNG path of picture ``key`` inside ``image_dir``.

    Metric names come from the run's data, so they never choose a path: the file name is ``key`` reduced to
    letters, digits, ``_`` and ``-`` (a suffix keeps two names apart), and the resolved path must lie inside
    ``image_dir`` (ReportError otherwise).
    """
    slug = _UNSAFE_NAME_CHARACTERS.sub("_", key).strip("_")[:100] or "metric"
    taken_names = {p.name for p in taken}
    path, count = image_dir / f"{slug}.png", 1
    while path.name in taken_names:
        count += 1
        path = image_dir / f"{slug}_{count}.png"
    inside = path.resolve().is_relative_to(image_dir.resolve())  # resolve() follows links planted in the folder
    if not inside or not image_dir.resolve().is_relative_to(image_dir.parent.resolve()):
        raise ReportError(f"refusing to write {path}: it resolves outside the report folder {image_dir}")
    return path


def _read(run_dir: Path) -> "Run":
    from layerwatch.rundir.runs import SeveralRunsError, read_run

    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    try:
        run = read_run(run_dir)
    except SeveralRunsError as error:
        raise ReportError(str(error)) from error
    except (FileNotFoundError, ValueError) as error:
        raise ReportError(f"no layerwatch run in {run_dir}: {error}") from error
    if len(run.steps) == 0:
        raise ReportError(f"the run in {run_dir} has no records yet")
    return run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``layerwatch report`` arguments to ``parser``."""
    parser.description = (
        "Draw a run as PNG pictures (heatmaps, depth profiles, histograms) and one HTML page; with several run "
        "directories, write one HTML page comparing them (the first is the reference)."
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="+", help="a layerwatch run directory (holding layerwatch.jsonl); "
        "give two or more to compare runs"
    )
    parser.add_argument(
        "--out", metavar="DIR", help="where report.html and report/ go (default: RUN_DIR); when comparing, the HTML "
        "file or its folder (default: ./layerwatch-comparison.html)"
    )
    parser.add_argument(
        "--allow-different-probes", action="store_true",
        help="compare runs probed with different prompts anyway (flagged in red; refused by default)",
    )
    parser.add_argument("--metrics", help="comma-separated metrics to draw (default: all the run has)")
    parser.add_argument("--dpi", type=int, default=110, help="image resolution (default 110)")


def main(args: argparse.Namespace) -> int:
    """Run ``layerwatch report``; returns the exit code (0 ok, 2 user error)."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        if len(args.run_dir) > 1:
            from layerwatch.analysis import compare

            comparison = compare.make_comparison(
                args.run_dir, out=args.out, metrics=metrics, dpi=args.dpi,
                allow_different_probes=args.allow_different_probes,
            )
            print(compare.describe(comparison))
            return 0
        report = make_report(args.run_dir[0], out=args.out, metrics=metrics, dpi=args.dpi)
    except ReportError as error:
        print(f"layerwatch report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report.html} and {len(report.images)} picture(s) in {report.html.parent / IMAGE_DIR}")
    return 0


def _standalone(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerwatch report")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_standalone())
