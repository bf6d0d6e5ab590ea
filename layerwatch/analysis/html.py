"""The pieces the report page and the comparison page share: reading one run, number formats, the style sheet,
embedded pictures, settings tables and writing a page without following planted links.

Everything here is public; ``layerwatch.analysis.report`` and ``layerwatch.analysis.compare`` both build on it and
neither imports the other's private names.
"""

from __future__ import annotations

import base64
import datetime
import io
import math
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from layerwatch.metrics import names, registry
from layerwatch.rundir.files import write_atomically
from layerwatch.rundir.images import format_value
from layerwatch.rundir.runs import SeveralRunsError, read_run

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from layerwatch.rundir.runs import Run

DASH = "\u2013"  # how a missing value (NaN) reads in a table
SIGNIFICANT_DIGITS = 3
STDERR_BAND = 2.0  # bands and marks use +-2 standard errors (about a 95% interval)


class ReportError(Exception):
    """A problem the user can fix (no run, matplotlib missing, a link planted in the output); the CLI prints it
    and exits 2."""


# ------------------------------------------------------------------------------------------------ reading a run
def read_one_run(run_dir: str | Path) -> "Run":
    """``read_run(run_dir)``, with every way it can fail turned into a :class:`ReportError` that says why."""
    run_dir = Path(run_dir)
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


# ------------------------------------------------------------------------------------------------ what a run holds
def ordered_metrics(run: "Run") -> list[str]:
    """The run's metrics in display order, leaving out all-NaN ones and an all-zero ``nonfinite``."""
    order = registry.all_metrics()  # registry order; metrics it does not know (an older run) come after
    ordered = [m for m in order if m in run.metrics] + [m for m in run.metrics if m not in order]
    kept = []
    for name in ordered:
        values = np.asarray(run.metric(name), dtype=np.float64)
        if not np.isfinite(values).any():
            continue
        if name == names.NONFINITE and not np.nan_to_num(values).any():
            continue
        kept.append(name)
    return kept


def best_layers(run: "Run") -> np.ndarray | None:
    """``[steps]`` best layer per probed step (NaN where unknown), or None when the run has no ``best_layer``."""
    return run.scalar(names.BEST_LAYER) if names.BEST_LAYER in getattr(run, "scalars", ()) else None


def stderr_of(run: "Run", metric: str) -> np.ndarray | None:
    """``[steps, layers]`` standard errors of ``metric`` (``Run.stderr``), or None when the run has none for it."""
    getter = getattr(run, "stderr", None)
    if getter is None:
        return None
    try:
        values = np.asarray(getter(metric), dtype=np.float64)
    except (KeyError, ValueError):
        return None
    return values if values.shape == np.shape(run.metric(metric)) and np.isfinite(values).any() else None


def profile_steps(steps: Sequence[int]) -> list[int]:
    """The first, middle and last probed steps (without repeats)."""
    steps = [int(s) for s in steps]
    if not steps:
        return []
    return list(dict.fromkeys([steps[0], steps[len(steps) // 2], steps[-1]]))



# ------------------------------------------------------------------------------------------------ numbers
def fmt(value: float, digits: int = SIGNIFICANT_DIGITS, *, scale: float | None = None) -> str:
    """A number with ``digits`` significant digits, the same way everywhere on the pages.

    Fixed notation from 1e-3 up to 1e6 (``0.512``, ``12.3``, ``4120``), else ``2.4e-07``-style; never ``-0``.
    ``scale``: the magnitude of the numbers shown with this one (e.g. the largest |value| of its table); a value
    below ``scale`` x 10^-(digits+1) is shown as ``0``, so a rounding residue such as ``-2.38e-07`` beside ``1.00``
    reads as the zero it is. NaN and infinity read as a dash.
    """
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DASH
    if not math.isfinite(value):
        return DASH
    if scale is not None and math.isfinite(scale) and abs(value) < abs(scale) * 10.0 ** -(digits + 1):
        value = 0.0
    return format_value(value, digits)


def scale_of(values: Any) -> float:
    """The largest finite |value| (0.0 when there is none): the ``scale`` for :func:`fmt` of a table."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def cell(value: float, *, scale: float | None = None, css: str = "") -> str:
    """One ``<td>`` of a table of numbers (``css``: an optional class, e.g. ``"significant"``)."""
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{fmt(value, scale=scale)}</td>"


# ------------------------------------------------------------------------------------------------ the page
CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 0.6em auto; max-width: 1560px;
       color: #222; padding: 0 1em; font-size: 15px; }
h1 { margin: 0 0 0.1em; font-size: 1.45em; } h2 { margin-top: 1.4em; border-bottom: 1px solid #ddd; }
h3 { margin: 1em 0 0.2em; }
.meta { color: #555; margin: 0.1em 0; } .note { color: #666; font-size: 0.9em; max-width: 75em; }
img { max-width: 100%; border: 1px solid #eee; display: block; }
img.wide { width: 100%; }
nav { display: flex; flex-wrap: wrap; gap: 0.2em 0.9em; margin: 0.3em 0; }
nav a { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
table.numbers { border-collapse: collapse; font-size: 0.85em; margin: 0.4em 0 1em; font-variant-numeric: tabular-nums; }
table.numbers th, table.numbers td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
table.numbers thead th { background: #f3f3f3; }
table.settings td, table.settings th { text-align: left; }
tr.differs td, tr.differs th { background: #fff3bf; }
td.significant { background: #ffe0dc; font-weight: bold; }
.alerts li { color: #a33; }
.warning { background: #fdecea; color: #a11; border: 2px solid #d33; padding: 0.5em 1em; }
.box { border: 1px solid #ddd; border-radius: 6px; padding: 0.4em 0.8em; margin-bottom: 0.6em; background: #fafafa; }
.box h2 { margin: 0.1em 0 0.3em; font-size: 1.05em; border: none; }
details summary { cursor: pointer; }
"""


def page_head(title: str, *, extra_css: str = "") -> list[str]:
    """The opening lines of a self-contained page (everything inline, nothing fetched)."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{CSS}{extra_css}</style></head><body>",
    ]


def generated() -> str:
    """``Generated 2026-01-02 13:45.`` for a page's header."""
    return f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}."


def nav(links: Sequence[tuple[str, str]]) -> str:
    """A navigation line that wraps: ``links`` are ``(anchor, text)`` pairs."""
    return "<nav>" + " ".join(f'<a href="#{escape(a)}">{escape(t)}</a>' for a, t in links) + "</nav>"


def data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI (the page embeds its pictures)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def png_bytes(figure: "Figure", dpi: int) -> bytes:
    """A figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def png_uri(figure: "Figure", dpi: int) -> str:
    """A figure as a PNG ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(figure, dpi)).decode("ascii")


def image_tag(uri: str, alt: str, *, css: str = "") -> str:
    attribute = f' class="{css}"' if css else ""
    return f'<img{attribute} src="{uri}" alt="{escape(alt)}">'


def alert_text(alert: Any) -> str:
    """An alert as one line: a typed alert's ``message`` (object or dict), else ``str(alert)``."""
    if isinstance(alert, dict):
        return str(alert.get("message") or alert)
    return str(getattr(alert, "message", None) or alert)


def setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return fmt(value)
    return str(value)


def settings_table(labels: Sequence[str], settings: Sequence[dict[str, Any]]) -> str:
    """The runs' settings side by side (one column per run); rows whose values differ are highlighted and listed
    first. With one run it is a plain two-column table."""
    keys = sorted({k for s in settings for k in s})
    if not keys:
        return '<p class="note">The run recorded no settings.</p>'
    shown = {k: [setting_text(s[k]) if k in s else DASH for s in settings] for k in keys}
    differing = [k for k in keys if len(settings) > 1 and len(set(shown[k])) > 1]
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    rows = []
    for key in differing + [k for k in keys if k not in differing]:
        css = ' class="differs"' if key in differing else ""
        cells = "".join(f"<td>{escape(v)}</td>" for v in shown[key])
        rows.append(f"<tr{css}><th>{escape(key)}</th>{cells}</tr>")
    note = (
        f'<p class="note">{len(differing)} setting(s) differ (highlighted, listed first).</p>'
        if len(settings) > 1 else ""
    )
    table = f'<table class="numbers settings"><thead><tr><th>setting</th>{head}</tr></thead><tbody>'
    return note + f'<div class="scroll">{table}{"".join(rows)}</tbody></table></div>'


# ------------------------------------------------------------------------------------------------ writing
def check_folder(folder: Path, within: Path) -> None:
    """Refuse an output folder that is a symbolic link, or resolves outside ``within`` (a link planted above it)."""
    if folder.is_symlink():
        raise ReportError(
            f"refusing to write into {folder}: it is a symbolic link (to {os.readlink(folder)}), and the report "
            f"never writes through links; remove the link (rm {folder}) and run again"
        )
    if folder.exists() and not folder.resolve().is_relative_to(within.resolve()):
        raise ReportError(f"refusing to write into {folder}: it resolves outside {within}")


def write_file(path: Path, payload: bytes | str) -> Path:
    """Write one output file atomically (a temporary file renamed into place). A symbolic link planted at ``path``
    is replaced by the new file, never followed, so nothing outside the output folder is touched."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise ReportError(f"cannot write {path}: a folder of that name is in the way; move it and run again")
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)
    return path


__all__ = [
    "ReportError", "escape", "read_one_run", "fmt", "scale_of", "cell", "CSS", "page_head", "generated", "nav", "data_uri",
    "png_bytes", "png_uri", "image_tag", "alert_text", "settings_table", "check_folder", "write_file",
    "STDERR_BAND", "DASH", "ordered_metrics", "best_layers", "stderr_of", "profile_steps",
]
