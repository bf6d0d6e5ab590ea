"""Runs side by side: ``layerwatch report RUN_A RUN_B [...]`` writes one self-contained HTML page.

The page opens with the runs, any warnings, and a table of the per-layer differences that exceed the runs'
combined uncertainty; then, for every metric the runs share:

- the runs' layer x step heatmaps next to each other on one colour scale (one colour bar for all);
- the depth profiles of all runs overlaid at matching steps (the first, middle and last step the runs have in common),
  with bands of +-2 standard errors where the runs recorded them; a run without values at a step is named in the
  panel with the reason;
- per-layer difference curves: each run minus the first run (the reference), over the common steps, one line per
  layer coloured by depth; a big dot marks |delta| > 2 sqrt(se_a^2 + se_b^2) (:func:`difference`);
- a table of the values at the last common step and their differences (beyond the uncertainty: a red cell).

It ends with the runs' settings side by side, the differing ones highlighted.

Numbers are only comparable when the runs probed the same prompts with the same settings. Runs whose probes differ
(the ``probe_hash`` every record carries, else the hash in ``probe.safetensors``) are refused unless
``allow_different_probes=True``, and then the page opens with a red warning. Differing metric settings (alpha,
views, temperatures) and differing layer counts are flagged at the top of the page.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layerwatch.analysis import html as page
from layerwatch.analysis.html import (
    STDERR_BAND,
    ReportError,
    ordered_metrics,
    profile_steps,
    read_one_run,
    stderr_of,
)
from layerwatch.metrics import names, registry
from layerwatch.rundir import images

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from layerwatch.rundir.runs import Run

logger = logging.getLogger(__name__)

COMPARISON_NAME = "layerwatch-comparison.html"
# Settings that change what a metric measures: runs that differ in them are flagged.
COMPARED_SETTINGS = (
    "alpha", "views", "num_prompts", "infonce_temperature", "lidar_delta", "dime_permutations",
)
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


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


def run_settings(run: "Run") -> dict[str, Any]:
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
    settings = [run_settings(run) for run in runs]
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


def values_at(run: "Run", metric: str, step: int, layers: Sequence[int], *, stderr: bool = False) -> np.ndarray:
    """``metric`` (or, with ``stderr``, its standard errors; NaN where none) of ``run`` at ``step`` and ``layers``."""
    if stderr:
        table = stderr_of(run, metric)
        if table is None:
            return np.full(len(layers), np.nan)
    else:
        table = np.asarray(run.metric(metric), dtype=np.float64)
    row = table[[int(s) for s in run.steps].index(step)]
    column = {layer: j for j, layer in enumerate(run.layers)}
    return np.array([row[column[layer]] for layer in layers], dtype=np.float64)


@dataclass
class Difference:
    """One run minus the reference over the common steps and layers, with its uncertainty.

    Attributes:
        delta: ``[steps, layers]`` run - reference.
        threshold: ``[steps, layers]`` 2 * sqrt(se_run^2 + se_reference^2), NaN where either has no standard error.
        marked: ``[steps, layers]`` bool, ``|delta| > threshold`` (False where the threshold is unknown).
    """

    delta: np.ndarray
    threshold: np.ndarray
    marked: np.ndarray


def difference(
    run: "Run", reference: "Run", metric: str, steps: Sequence[int], layers: Sequence[int]
) -> Difference:
    """``run - reference`` of ``metric``; a per-layer difference is marked when it exceeds the combined uncertainty
    of the two runs, ``|delta| > 2 * sqrt(se_run^2 + se_reference^2)``."""
    def table(of: "Run", stderr: bool) -> np.ndarray:
        return np.array([values_at(of, metric, s, layers, stderr=stderr) for s in steps]).reshape(len(steps), -1)

    delta = table(run, False) - table(reference, False)
    threshold = STDERR_BAND * np.sqrt(table(run, True) ** 2 + table(reference, True) ** 2)
    with np.errstate(invalid="ignore"):
        marked = np.isfinite(delta) & np.isfinite(threshold) & (np.abs(delta) > threshold)
    return Difference(delta=delta, threshold=threshold, marked=marked)


def empty_reason(run: "Run", metric: str, step: int) -> str:
    """Why ``metric`` has no value at ``step`` in ``run`` (for the note in an empty panel)."""
    if metric == names.CKA_TO_PREVIOUS and int(step) == int(run.steps[0]):
        return f"no value at step {step}, the run's first probe: nothing earlier to compare with"
    if metric == names.BEST_LAYER or metric == names.PROBE_ACCURACY:
        return f"no value at step {step}: it needs a probe with class labels"
    return f"no value at step {step}: not measured (or not finite) at this probe"


# ------------------------------------------------------------------------------------------------ figures
def heatmaps_figure(runs: Sequence["Run"], labels: Sequence[str], metric: str) -> "Figure":
    """The runs' heatmaps of ``metric`` side by side on one colour scale, with one colour bar."""
    matrices = [np.asarray(run.metric(metric), dtype=np.float64).T for run in runs]
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    height = min(6.0, max(2.8, 1.6 + 0.14 * max(len(run.layers) for run in runs)))
    figure = images.new_figure(min(14.0, 5.0 * len(runs) + 1.2), height)
    axes_list = figure.subplots(1, len(runs), squeeze=False)[0]
    image = None
    for axes, run, label, matrix in zip(axes_list, runs, labels, matrices):
        image = images.draw_heatmap(axes, matrix, run.steps, run.layers, vmin=vmin, vmax=vmax, title=label)
    figure.colorbar(image, ax=list(axes_list)).set_label(metric)
    figure.suptitle(f"{metric}: layer x step, runs side by side on one colour scale (grey = no value)")
    return figure


def _note(axes: "Axes", lines: Sequence[str]) -> None:
    """Say in an (otherwise empty) panel why it is empty: one wrapped paragraph per line."""
    text = "\n".join(textwrap.fill(line, 46) for line in lines)
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", fontsize=8,
              color="#7a1f1f", bbox={"facecolor": "#fff8e6", "edgecolor": "#e0c080", "pad": 4})


def profiles_figure(runs: Sequence["Run"], labels: Sequence[str], metric: str, steps: Sequence[int]) -> "Figure":
    """One panel per chosen step: every run's depth profile of ``metric`` at that step, overlaid, with bands of
    +-2 standard errors where recorded; a run without values at a step is named in the panel with the reason."""
    figure = images.new_figure(min(14.0, 4.4 * len(steps) + 0.6), 3.3)
    axes_list = figure.subplots(1, len(steps), squeeze=False, sharey=True)[0]
    for axes, step in zip(axes_list, steps):
        empty = []
        for index, (run, label) in enumerate(zip(runs, labels)):
            values = values_at(run, metric, step, run.layers)
            if not np.isfinite(values).any():
                empty.append(f"{label}: {empty_reason(run, metric, step)}")
                continue
            colour = RUN_COLOURS[index % len(RUN_COLOURS)]
            se = values_at(run, metric, step, run.layers, stderr=True)
            axes.plot(run.layers, values, marker="o", ms=3, lw=1.5, color=colour, label=label)
            low, high = values - STDERR_BAND * se, values + STDERR_BAND * se
            if np.isfinite(low).any():
                axes.fill_between(run.layers, low, high, color=colour, alpha=0.18, linewidth=0)
        if empty:
            _note(axes, empty)
        axes.set_title(f"step {step}")
        axes.set_xlabel("layer (0 = embeddings)")
        layers = runs[0].layers
        axes.set_xticks([layers[i] for i in images.tick_positions(len(layers), 12)])
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(metric)
    if any(axes.get_lines() for axes in axes_list):
        next(axes for axes in axes_list if axes.get_lines()).legend(fontsize="small")
    figure.suptitle(f"{metric}: depth profiles of the runs at the same steps (shaded: \u00b12 standard errors)")
    return figure


def differences_figure(
    runs: Sequence["Run"], labels: Sequence[str], metric: str, steps: Sequence[int], layers: Sequence[int]
) -> "Figure":
    """One panel per run after the first: ``run - first run`` per layer over the common steps (lines by depth);
    a large dot marks a difference beyond the combined uncertainty, ``|delta| > 2 sqrt(se_a^2 + se_b^2)``."""
    import matplotlib
    from matplotlib.colors import Normalize

    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    others = list(zip(runs[1:], labels[1:]))
    figure = images.new_figure(min(14.0, max(9.0, 4.6 * len(others) + 1.2)), 3.7)
    axes_list = figure.subplots(1, len(others), squeeze=False, sharey=True)[0]
    for axes, (run, label) in zip(axes_list, others):
        result = difference(run, runs[0], metric, steps, layers)
        for j, layer in enumerate(layers):
            colour = cmap(norm(layer))
            axes.plot(steps, result.delta[:, j], color=colour, lw=1.1, marker="." if len(steps) < 30 else None)
            marked = result.marked[:, j]
            if marked.any():
                axes.plot(np.asarray(steps)[marked], result.delta[marked, j], "o", color=colour, ms=5.5,
                          markeredgecolor="black", markeredgewidth=0.6)
        if not np.isfinite(result.delta).any():
            _note(axes, [f"no finite difference: {empty_reason(run, metric, steps[0])}"])
        axes.axhline(0.0, color="#444444", lw=0.8)
        images.set_step_scale(axes, steps)
        axes.set_title(f"{label} \u2212 {labels[0]}")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(f"difference in {metric}")
    colorbar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes_list), shrink=0.85)
    colorbar.set_ticks([layers[i] for i in images.tick_positions(len(layers), 13)])
    colorbar.set_label("layer")
    figure.suptitle(f"{metric}: per-layer difference from {labels[0]}\nbig dot: |\u0394| > 2\u221a(se_a\u00b2 + "
                    "se_b\u00b2), beyond the two runs' combined uncertainty", fontsize="medium")
    return figure


# ------------------------------------------------------------------------------------------------ the page
def _last_step_table(runs, labels, metric: str, step: int, layers: Sequence[int]) -> str:
    values = [values_at(run, metric, step, layers) for run in runs]
    results = [difference(run, runs[0], metric, [step], layers) for run in runs[1:]]
    scale = page.scale_of(values)
    esc = page.escape
    head = "".join(f"<th>{esc(label)}</th>" for label in labels)
    head += "".join(f"<th>{esc(label)} &minus; {esc(labels[0])}</th>" for label in labels[1:])
    rows = [f'<div class="scroll"><table class="numbers"><thead><tr><th>layer</th>{head}</tr></thead><tbody>']
    for j, layer in enumerate(layers):
        cells = "".join(page.cell(v[j], scale=scale) for v in values)
        cells += "".join(
            page.cell(r.delta[0, j], scale=scale, css="significant" if r.marked[0, j] else "") for r in results
        )
        rows.append(f"<tr><th>{layer}</th>{cells}</tr>")
    rows.append("</tbody></table></div>")
    return "\n".join(rows)


def _metric_section(runs, labels, metric: str, steps: Sequence[int], layers: Sequence[int], dpi: int) -> list[str]:
    esc = page.escape
    note = registry.describe(metric) if metric in registry.all_metrics() else ""
    parts = [f'<h2 id="{esc(metric)}">{esc(metric)}</h2>', f'<p class="note">{esc(note)}</p>']

    def picture(figure: "Figure", alt: str) -> None:
        parts.append(page.image_tag(page.png_uri(figure, dpi), alt))

    picture(heatmaps_figure(runs, labels, metric), f"{metric}: heatmaps of the runs on one colour scale")
    if not steps:
        parts.append('<p class="warning">The runs have no probed step in common: no overlays or differences.</p>')
        return parts
    picture(profiles_figure(runs, labels, metric, profile_steps(steps)), f"{metric}: overlaid depth profiles")
    picture(differences_figure(runs, labels, metric, steps, layers), f"{metric}: per-layer differences")
    parts.append(f"<h3>{esc(metric)} at step {steps[-1]}, the last common step</h3>")
    parts.append(_last_step_table(runs, labels, metric, steps[-1], layers))
    return parts


UNCERTAINTY_NOTE = (
    "A per-layer difference is marked (a big dot in the difference curves, a red cell in the tables) when it is "
    "larger than the two runs' combined uncertainty: |\u0394| > 2\u00b7\u221a(se_a\u00b2 + se_b\u00b2), with se the "
    "standard errors each run recorded for that layer and step (about a 95% test of no difference). Shaded bands in "
    "the depth profiles are \u00b12 se."
)


def uncertainty_summary(runs, labels, metrics: Sequence[str], steps: Sequence[int], layers: Sequence[int]) -> str:
    """A table: per metric and run, how many layers differ from the reference beyond the combined uncertainty at
    the last common step."""
    if not steps:
        return ""
    esc = page.escape
    head = "".join(f"<th>{esc(label)} vs {esc(labels[0])}</th>" for label in labels[1:])
    rows = []
    for metric in metrics:
        cells = []
        for run in runs[1:]:
            result = difference(run, runs[0], metric, [steps[-1]], layers)
            if not np.isfinite(result.threshold).any():
                cells.append("<td>no standard errors</td>")
                continue
            count = int(result.marked.sum())
            css = ' class="significant"' if count else ""
            cells.append(f"<td{css}>{count} of {len(layers)} layers</td>")
        rows.append(f'<tr><th><a href="#{esc(metric)}">{esc(metric)}</a></th>{"".join(cells)}</tr>')
    return (
        f'<p class="note">{esc(UNCERTAINTY_NOTE)} At step {steps[-1]}, the last common step:</p><div class="scroll">'
        f'<table class="numbers"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
        "</table></div>"
    )


def _runs_list(runs, labels, paths) -> list[str]:
    esc = page.escape
    parts = ['<ul class="meta">']
    for index, (run, label, path) in enumerate(zip(runs, labels, paths)):
        role = " (reference: differences are taken from this run)" if index == 0 else ""
        parts.append(
            f"<li><b>{esc(label)}</b>{role}: <code>{esc(str(path))}</code>, {len(run.steps)} probes "
            f"(steps {int(run.steps[0])} to {int(run.steps[-1])}), layers {run.layers[0]} to {run.layers[-1]}</li>"
        )
    parts.append("</ul>")
    return parts


def _settings_section(labels: Sequence[str], settings: Sequence[dict[str, Any]]) -> list[str]:
    """The runs' settings side by side, folded when they agree and open (differences first) when they do not."""
    keys = sorted({k for s in settings for k in s})
    differing = [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]
    summary = (f"{len(differing)} differ: {', '.join(differing)}" if differing else "all the same")
    return [
        f'<details id="settings"{" open" if differing else ""}><summary><b>Settings side by side</b> '
        f"({page.escape(summary)})</summary>",
        page.settings_table(labels, settings),
        "</details>",
    ]


def render_comparison(runs, labels, paths, metrics: Sequence[str], warnings: Sequence[str], dpi: int) -> str:
    """The comparison page: which runs, warnings, their settings side by side, the differences beyond the
    uncertainty, then one section per metric."""
    esc = page.escape
    steps = common_steps(runs)
    layers = [layer for layer in runs[0].layers if all(layer in run.layers for run in runs[1:])]
    parts = page.page_head(f"layerwatch comparison: {', '.join(labels)}")
    parts.append("<h1>layerwatch comparison</h1>")
    parts += _runs_list(runs, labels, paths)
    parts.append(f'<p class="meta">{len(steps)} step(s) in common. {page.generated()}</p>')
    parts.extend(f'<p class="warning">{esc(w)}</p>' for w in warnings)
    parts.append(page.nav([(m, m) for m in metrics] + [("settings", "settings")]))
    parts += _settings_section(labels, [run_settings(run) for run in runs])
    parts.append('<h2 id="differences">Differences beyond the uncertainty</h2>')
    parts.append(uncertainty_summary(runs, labels, metrics, steps, layers))
    for metric in metrics:
        parts.extend(_metric_section(runs, labels, metric, steps, layers, dpi))
    parts.append("</body></html>")
    return "\n".join(parts)


def _shared_metrics(runs: Sequence["Run"], requested: str | Sequence[str] | None) -> list[str]:
    if isinstance(requested, str) and requested in registry.PRESETS:
        wanted = set(registry.resolve_metrics(requested)[1])
        return [m for m in ordered_metrics(runs[0]) if m in wanted and all(m in run.metrics for run in runs[1:])]
    if isinstance(requested, str):
        requested = [m.strip() for m in requested.split(",") if m.strip()]
    if requested:
        missing = [m for m in requested if any(m not in run.metrics for run in runs)]
        if missing:
            raise ReportError(f"not every run has the metric(s) {', '.join(missing)}")
        return list(dict.fromkeys(requested))
    return [m for m in ordered_metrics(runs[0]) if all(m in run.metrics for run in runs[1:])]


def make_comparison(
    run_dirs: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    dpi: int = 100,
    allow_different_probes: bool = False,
) -> Comparison:
    """Compare two or more runs in one self-contained HTML page (pictures embedded).

    Args:
        run_dirs: the run directories; the first is the reference the differences are taken from.
        out: the HTML file to write, or a folder to write ``layerwatch-comparison.html`` into (default: the current
            folder). It is written atomically: a link planted at that name is replaced, not followed.
        metrics: the metrics to compare: names or a preset (default: every metric all runs have, minus all-NaN ones).
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
    runs = [read_one_run(path) for path in paths]
    labels = run_labels(paths)
    warnings = check_comparable(runs, labels, allow_different_probes=allow_different_probes)
    chosen = _shared_metrics(runs, metrics)
    if not chosen:
        raise ReportError("the runs have no metric in common with finite values")
    target = Path(out) if out is not None else Path.cwd()
    if target.suffix.lower() not in (".html", ".htm"):
        target = target / COMPARISON_NAME
    page.write_file(target, render_comparison(runs, labels, paths, chosen, warnings, dpi))
    for warning in warnings:
        logger.warning("layerwatch comparison: %s", warning)
    return Comparison(html=target, labels=labels, metrics=chosen, warnings=warnings)


def describe(comparison: Comparison) -> str:
    """The one-line summary the CLI prints."""
    flagged = f"; {len(comparison.warnings)} warning(s) at the top of the page" if comparison.warnings else ""
    return f"wrote {comparison.html}: {' vs '.join(comparison.labels)}, {len(comparison.metrics)} metric(s){flagged}"


__all__ = [
    "Comparison", "Difference", "make_comparison", "check_comparable", "probe_identity", "run_labels",
    "common_steps", "difference", "values_at", "render_comparison", "COMPARISON_NAME",
]
