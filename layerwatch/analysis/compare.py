"""Runs side by side: ``layerwatch report RUN_A RUN_B [...]`` writes one self-contained HTML page.

For every metric the runs share, the page shows

- the runs' layer x step heatmaps next to each other on one colour scale (one colour bar for all);
- the depth profiles of all runs overlaid at matching steps (the first, middle and last step the runs have in common);
- per-layer difference curves: each run minus the first run (the reference), over the common steps, one line per
  layer coloured by depth;
- a table of the values at the last common step and their differences.

Numbers are only comparable when the runs probed the same prompts with the same settings. Runs whose probes differ
(the ``probe_hash`` every record carries, else the hash in ``probe.safetensors``) are refused unless
``allow_different_probes=True``, and then the page opens with a red warning. Differing metric settings (alpha,
views, temperatures) and differing layer counts are flagged at the top of the page.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layerwatch.rundir import images

from layerwatch.metrics import registry
from layerwatch.analysis.report import _CSS, ReportError, _cell, _read, ordered_metrics, profile_steps

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from layerwatch.rundir.runs import Run

logger = logging.getLogger(__name__)

COMPARISON_NAME = "layerwatch-comparison.html"
# Settings that change what a metric measures: runs that differ in them are flagged.
COMPARED_SETTINGS = (
    "alpha", "views", "num_prompts", "infonce_temperature", "lidar_delta", "dime_permutations",
)
_RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_STEP_STYLES = ("-", "--", ":")


@dataclass
class Comparison:
    """What :func:`make_comparison` wrote and what it flagged."""

    html: Path
    labels: list[str]
    metrics: list[str]
    warnings: list[str] = field(default_factory=list)


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names for runs: the last path component, or as many trailing components as tell them apart."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same folder twice


def probe_identity(run: "Run") -> str | None:
    """The content hash of the run's probe: from its records' settings, else from ``probe.safetensors``."""
    for record in reversed(run.records):
        value = (getattr(record, "settings", None) or {}).get("probe_hash")
        if value:
            return str(value)
    path = Path(run.logdir) / "probe.safetensors"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                value = (handle.metadata() or {}).get("content_hash")
            if value:
                return str(value)
        except Exception as error:  # noqa: BLE001 - an unreadable probe file is reported as "unknown"
            logger.warning("cannot read the probe hash of %s: %s", path, error)
    return None


def _settings(run: "Run") -> dict[str, Any]:
    return dict(getattr(run.records[-1], "settings", {}) or {}) if run.records else {}


def check_comparable(runs: Sequence["Run"], labels: Sequence[str], *, allow_different_probes: bool) -> list[str]:
    """Refuse runs probed with different prompts (unless allowed); return warnings for the top of the page."""
    warnings: list[str] = []
    hashes = [probe_identity(run) for run in runs]
    known = {h for h in hashes if h}
    described = ", ".join(f"{label}: {h[:12] if h else 'unknown'}" for label, h in zip(labels, hashes))
    if len(known) > 1:
        message = (
            f"the runs were probed with different probes ({described}); their numbers are not comparable. Probe "
            "them with the same probe (pass --probe RUN_A/probe.safetensors), or pass --allow-different-probes to "
            "draw them anyway"
        )
        if not allow_different_probes:
            raise ReportError(message)
        warnings.append("DIFFERENT PROBES: " + message.split(". Probe them")[0] + ".")
    elif any(h is None for h in hashes):
        warnings.append(f"The probe of some runs is unknown ({described}); check that they used the same prompts.")
    settings = [_settings(run) for run in runs]
    for key in COMPARED_SETTINGS:
        values = [s.get(key) for s in settings]
        if len({repr(v) for v in values if v is not None}) > 1:
            shown = ", ".join(f"{label}: {v}" for label, v in zip(labels, values))
            warnings.append(f"Different {key} ({shown}): the metrics that depend on it are not comparable.")
    layer_sets = {tuple(run.layers) for run in runs}
    if len(layer_sets) > 1:
        shown = ", ".join(f"{label}: {len(run.layers)}" for label, run in zip(labels, runs))
        warnings.append(f"The runs have different numbers of layers ({shown}); differences use the common layers.")
    return warnings


def common_steps(runs: Sequence["Run"]) -> list[int]:
    """The steps every run probed, ascending."""
    shared = set(int(s) for s in runs[0].steps)
    for run in runs[1:]:
        shared &= {int(s) for s in run.steps}
    return sorted(shared)


def _values_at(run: "Run", metric: str, step: int, layers: Sequence[int]) -> np.ndarray:
    row = np.asarray(run.metric(metric), dtype=np.float64)[[int(s) for s in run.steps].index(step)]
    column = {layer: j for j, layer in enumerate(run.layers)}
    return np.array([row[column[layer]] for layer in layers])


def _png_uri(figure: "Figure", dpi: int) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmaps_figure(runs: Sequence["Run"], labels: Sequence[str], metric: str) -> "Figure":
    """The runs' heatmaps of ``metric`` side by side on one colour scale, with one colour bar."""
    matrices = [np.asarray(run.metric(metric), dtype=np.float64).T for run in runs]
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    width, height = images.heatmap_size(max(len(run.steps) for run in runs), max(len(run.layers) for run in runs))
    figure = images.new_figure(min(22.0, 0.75 * width * len(runs) + 1.2), height)
    axes_list = figure.subplots(1, len(runs), squeeze=False)[0]
    image = None
    for axes, run, label, matrix in zip(axes_list, runs, labels, matrices):
        image = images.draw_heatmap(axes, matrix, run.steps, run.layers, vmin=vmin, vmax=vmax, title=label)
    figure.colorbar(image, ax=list(axes_list)).set_label(metric)
    figure.suptitle(f"{metric}: layer x step, runs side by side on one colour scale")
    return figure


def profiles_figure(runs: Sequence["Run"], labels: Sequence[str], metric: str, steps: Sequence[int]) -> "Figure":
    """One panel per chosen step: every run's depth profile of ``metric`` at that step, overlaid."""
    figure = images.new_figure(4.4 * len(steps) + 0.6, 3.4)
    axes_list = figure.subplots(1, len(steps), squeeze=False, sharey=True)[0]
    for axes, step in zip(axes_list, steps):
        for index, (run, label) in enumerate(zip(runs, labels)):
            values = _values_at(run, metric, step, run.layers)
            colour = _RUN_COLOURS[index % len(_RUN_COLOURS)]
            axes.plot(run.layers, values, marker="o", ms=3.5, lw=1.6, color=colour, label=label)
        axes.set_title(f"step {step}")
        axes.set_xlabel("layer (0 = embeddings)")
        layers = runs[0].layers
        axes.set_xticks([layers[i] for i in images.tick_positions(len(layers), 17)])
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(metric)
    axes_list[0].legend(fontsize="small")
    figure.suptitle(f"{metric}: depth profiles of the runs at the same steps")
    return figure


def differences_figure(
    runs: Sequence["Run"], labels: Sequence[str], metric: str, steps: Sequence[int], layers: Sequence[int]
) -> "Figure":
    """One panel per run after the first: ``run - first run`` per layer over the common steps (lines by depth)."""
    import matplotlib
    from matplotlib.colors import Normalize

    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    others = list(zip(runs[1:], labels[1:]))
    figure = images.new_figure(max(7.0, 4.6 * len(others) + 1.2), 3.6)
    axes_list = figure.subplots(1, len(others), squeeze=False, sharey=True)[0]
    reference = np.array([_values_at(runs[0], metric, s, layers) for s in steps])
    for axes, (run, label) in zip(axes_list, others):
        difference = np.array([_values_at(run, metric, s, layers) for s in steps]) - reference
        for j, layer in enumerate(layers):
            axes.plot(steps, difference[:, j], color=cmap(norm(layer)), lw=1.2, marker="." if len(steps) < 30 else None)
        axes.axhline(0.0, color="#444444", lw=0.8)
        images.set_step_scale(axes, steps)
        axes.set_title(f"{label} \u2212 {labels[0]}")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(f"difference in {metric}")
    colorbar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes_list), shrink=0.85)
    colorbar.set_ticks([layers[i] for i in images.tick_positions(len(layers), 13)])
    colorbar.set_label("layer")
    figure.suptitle(f"{metric}: per-layer difference from {labels[0]}")
    return figure


def _last_step_table(runs, labels, metric: str, step: int, layers: Sequence[int]) -> str:
    values = [_values_at(run, metric, step, layers) for run in runs]
    esc = html.escape
    head = "".join(f"<th>{esc(label)}</th>" for label in labels)
    head += "".join(f"<th>{esc(label)} &minus; {esc(labels[0])}</th>" for label in labels[1:])
    rows = [f'<table class="numbers"><thead><tr><th>layer</th>{head}</tr></thead><tbody>']
    for j, layer in enumerate(layers):
        cells = "".join(f"<td>{_cell(v[j])}</td>" for v in values)
        cells += "".join(f"<td>{_cell(v[j] - values[0][j])}</td>" for v in values[1:])
        rows.append(f"<tr><th>{layer}</th>{cells}</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _metric_section(runs, labels, metric: str, steps: Sequence[int], layers: Sequence[int], dpi: int) -> list[str]:
    esc = html.escape
    parts = [f'<h2 id="{esc(metric)}">{esc(metric)}</h2>', f'<p class="note">{esc(registry.describe(metric))}</p>']

    def picture(figure: "Figure", alt: str) -> None:
        parts.append(f'<p><img src="{_png_uri(figure, dpi)}" alt="{esc(alt)}"></p>')

    picture(heatmaps_figure(runs, labels, metric), f"{metric}: heatmaps of the runs on one colour scale")
    if not steps:
        parts.append('<p class="warning">The runs have no probed step in common: no overlays or differences.</p>')
        return parts
    picture(profiles_figure(runs, labels, metric, profile_steps(steps)), f"{metric}: overlaid depth profiles")
    picture(differences_figure(runs, labels, metric, steps, layers), f"{metric}: per-layer differences")
    parts.append(f"<h3>{esc(metric)} at step {steps[-1]}, the last common step</h3>")
    parts.append(_last_step_table(runs, labels, metric, steps[-1], layers))
    return parts


_COMPARE_CSS = ".warning { background: #fdecea; color: #a11; border: 2px solid #d33; padding: 0.6em 1em; }\n"


def render_comparison(runs, labels, paths, metrics: Sequence[str], warnings: Sequence[str], dpi: int) -> str:
    """The comparison page: which runs, warnings, then one section per metric."""
    esc = html.escape
    steps = common_steps(runs)
    layers = [layer for layer in runs[0].layers if all(layer in run.layers for run in runs[1:])]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>layerwatch comparison: {esc(', '.join(labels))}</title>",
        f"<style>{_CSS}{_COMPARE_CSS}</style></head><body>",
        "<h1>layerwatch comparison</h1>",
        "<ul class=\"meta\">",
    ]
    for index, (run, label, path) in enumerate(zip(runs, labels, paths)):
        role = " (reference: differences are taken from this run)" if index == 0 else ""
        parts.append(
            f"<li><b>{esc(label)}</b>{role}: <code>{esc(str(path))}</code>, {len(run.steps)} probes "
            f"(steps {int(run.steps[0])} to {int(run.steps[-1])}), layers {run.layers[0]} to {run.layers[-1]}</li>"
        )
    parts.append("</ul>")
    parts.append(
        f'<p class="meta">{len(steps)} step(s) in common. Generated '
        f"{esc(datetime.datetime.now().strftime('%Y-%m-%d %H:%M'))}.</p>"
    )
    parts.extend(f'<p class="warning">{esc(w)}</p>' for w in warnings)
    parts.append("<nav>" + "".join(f'<a href="#{esc(m)}">{esc(m)}</a>' for m in metrics) + "</nav>")
    for metric in metrics:
        parts.extend(_metric_section(runs, labels, metric, steps, layers, dpi))
    parts.append("</body></html>")
    return "\n".join(parts)


def _shared_metrics(runs: Sequence["Run"], requested: Sequence[str] | None) -> list[str]:
    if requested:
        missing = [(m, [i for i, run in enumerate(runs) if m not in run.metrics]) for m in requested]
        missing = [m for m, where in missing if where]
        if missing:
            raise ReportError(f"not every run has the metric(s) {', '.join(missing)}")
        return list(requested)
    names = ordered_metrics(runs[0])
    return [m for m in names if all(m in run.metrics for run in runs[1:])]


def make_comparison(
    run_dirs: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    dpi: int = 100,
    allow_different_probes: bool = False,
) -> Comparison:
    """Compare two or more runs in one self-contained HTML page (pictures embedded).

    Args:
        run_dirs: the run directories; the first is the reference the differences are taken from.
        out: the HTML file to write, or a folder to write ``layerwatch-comparison.html`` into (default: the current
            folder).
        metrics: the metrics to compare (default: every metric all runs have, minus all-NaN ones).
        dpi: image resolution.
        allow_different_probes: draw runs probed with different prompts anyway (the page then opens with a red
            warning); by default they are refused.

    Raises:
        ReportError: fewer than two runs, a folder without a run, different probes, no shared metric, or matplotlib
            missing.
    """
    if len(run_dirs) < 2:
        raise ReportError("a comparison needs at least two run directories")
    if not images.have_matplotlib():
        raise ReportError("layerwatch report needs matplotlib: pip install matplotlib")
    paths = [Path(p) for p in run_dirs]
    runs = [_read(path) for path in paths]
    labels = run_labels(paths)
    warnings = check_comparable(runs, labels, allow_different_probes=allow_different_probes)
    names = _shared_metrics(runs, metrics)
    if not names:
        raise ReportError("the runs have no metric in common with finite values")
    target = Path(out) if out is not None else Path.cwd()
    if target.suffix.lower() not in (".html", ".htm"):
        target = target / COMPARISON_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_comparison(runs, labels, paths, names, warnings, dpi), encoding="utf-8")
    for warning in warnings:
        logger.warning("layerwatch comparison: %s", warning)
    return Comparison(html=target, labels=labels, metrics=names, warnings=warnings)


def describe(comparison: Comparison) -> str:
    """The one-line summary the CLI prints."""
    flagged = f"; {len(comparison.warnings)} warning(s) at the top of the page" if comparison.warnings else ""
    return f"wrote {comparison.html}: {' vs '.join(comparison.labels)}, {len(comparison.metrics)} metric(s){flagged}"


__all__ = ["Comparison", "make_comparison", "check_comparable", "probe_identity", "run_labels", "common_steps"]
