"""A run as a text table for the terminal (the demo's and ``layerwatch trajectory``'s closing table).

Per layer, the first and last probed value of each main metric; InfoNCE with its measured chance level beside it
(InfoNCE alone rises when views drift apart *or* when chance moves, so it is never shown without it); then the
layers that changed most, and one line per metric on how to read it (the registry's description).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from layerwatch.metrics import names, registry
from layerwatch.rundir.runs import Run

# A metric shown with its baseline in the same cell: "value -> value (chance x)".
BASELINES = {names.INFONCE: names.INFONCE_CHANCE}


def significant(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, never ``-0``: ``0.000123`` -> ``0.000123``, ``1234.5`` -> ``1234``."""
    if not math.isfinite(value):
        return "nan"
    if abs(value) < 0.5 * 10.0 ** -(digits + 3):  # rounding noise around zero (e.g. DiME's -2e-07)
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def _cells(run: Run, name: str, values: np.ndarray) -> list[str]:
    baseline = BASELINES.get(name)
    chance = np.asarray(run.metric(baseline), dtype=np.float64) if baseline in run.metrics else None
    cells = []
    for index in range(len(run.layers)):
        cell = f"{significant(values[0, index])} -> {significant(values[-1, index])}"
        if chance is not None:
            cell += f" (chance {significant(chance[-1, index])})"
        cells.append(cell)
    return cells


def _table(header: list[str], columns: list[list[str]], first: list[str]) -> list[str]:
    rows = [[first[i], *(column[i] for column in columns)] for i in range(len(first))]
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(widths[c]) for c, cell in enumerate(header)), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(cell.rjust(widths[c]) for c, cell in enumerate(row)) for row in rows]


def _changed_most(run: Run, names_shown: list[str], values: dict[str, np.ndarray], top: int) -> list[str]:
    lines = []
    for name in names_shown:
        change = values[name][-1] - values[name][0]
        order = [i for i in np.argsort(-np.nan_to_num(np.abs(change), nan=-1.0)) if math.isfinite(change[i])]
        if order:
            described = ", ".join(f"layer {run.layers[i]} ({'+' if change[i] >= 0 else ''}{significant(change[i])})"
                                  for i in order[:top])
            lines.append(f"  {name}: {described}")
    return lines


def summary_table(run: Run, metrics: Sequence[str] | None = None, *, top: int = 3) -> str:
    """A text table: per layer, the first and last probed value of each main metric, then which layers changed most
    and how to read each metric.

    Args:
        run: a run read by :func:`layerwatch.read_run`.
        metrics: the metrics to show (default: the main metrics the run has, the registry's ``summary`` ones).
        top: how many layers to name per metric in the "changed most" lines.
    """
    shown = [m for m in (metrics or registry.summary_metrics()) if m in run.metrics]
    steps = [int(s) for s in run.steps]
    if not steps or not shown:
        return "(the run has no records)"
    values = {name: np.asarray(run.metric(name), dtype=np.float64) for name in shown}
    header = ["layer"] + [f"{name} ({steps[0]}->{steps[-1]})" for name in shown]
    lines = _table(header, [_cells(run, name, values[name]) for name in shown], [str(layer) for layer in run.layers])
    if len(steps) > 1:
        lines += ["", f"layers that changed most from step {steps[0]} to step {steps[-1]} (last - first):"]
        lines += _changed_most(run, shown, values, top)
    lines += ["", "how to read them:"]
    lines += [f"  {name}: {registry.REGISTRY[name].description}" for name in shown if name in registry.REGISTRY]
    return "\n".join(lines)
