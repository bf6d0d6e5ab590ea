"""Reading a run back: ``layerwatch.read_run(logdir)`` returns its per-layer time series as numpy arrays.

Any metric name is read (registered or not, e.g. from an older version); :func:`layerwatch.analysis.summary.summary_table` shows the registry's
``summary`` metrics by default."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from layerwatch.metrics import registry
from layerwatch.rundir.record import ERRORS, PROBE_SECONDS, SCALAR_PREFIX, STDERR_PREFIX, ProbeRecord
from layerwatch.rundir.files import JSONL_NAME, PROBE_FILENAME, RUN_SUBFOLDER
from layerwatch.rundir.writers import read_jsonl_records

logger = logging.getLogger(__name__)

_SCALAR_TAG = re.compile(rf"^{SCALAR_PREFIX}/(?P<metric>[^/]+)/layer_(?P<layer>\d+)$")
_LAYER_RUN = re.compile(r"^layer_(?P<layer>\d+)$")
_METRIC_TAG = re.compile(rf"^{SCALAR_PREFIX}/(?P<metric>[^/]+)$")
_STDERR_TAG = re.compile(rf"^{STDERR_PREFIX}/(?P<metric>[^/]+)$")


class Run:
    """The time series of one run.

    Attributes:
        steps: probed steps, ascending (numpy int array).
        layers: layer indices (0 = embedding output).
        metrics: metric names, in the order first seen.
        scalars: names of the single-number-per-probe series, read with :meth:`scalar`: ``probe_seconds`` (each
            probe's wall time), ``best_layer`` (labelled probes), and ``errors`` (the running count of failed probes)
            for a run read from TensorBoard events.
        records: the parsed probe records (empty for a run read from TensorBoard events only).
    """

    def __init__(
        self, logdir: Path, records: list[ProbeRecord], values: dict[str, np.ndarray], steps, layers,
        scalars: dict[str, np.ndarray] | None = None, stderr: dict[str, np.ndarray] | None = None,
    ):
        self.logdir = logdir
        self._scalars = scalars or {}
        self.scalars = list(self._scalars)
        self.records = records
        self.steps = np.asarray(steps, dtype=np.int64)
        self.layers = list(layers)
        self._values = values
        self.metrics = list(values)
        self._stderr = stderr or {}

    def metric(self, name: str) -> np.ndarray:
        """``[steps, layers]`` values of one metric (NaN where a probe did not record it)."""
        if name not in self._values:
            raise KeyError(f"metric {name!r} is not in this run; it has {self.metrics}")
        return self._values[name]

    def scalar(self, name: str) -> np.ndarray:
        """``[steps]`` values of a single-number series such as ``probe_seconds`` or ``best_layer`` (NaN where a probe
        lacks it)."""
        if name not in self._scalars:
            raise KeyError(f"scalar {name!r} is not in this run; it has {self.scalars}")
        return self._scalars[name]

    def stderr(self, name: str) -> np.ndarray:
        """``[steps, layers]`` standard errors of one metric (SPEC §8; NaN where a probe did not record one).

        Per-prompt metrics: std(ddof=1)/sqrt(n) of the per-prompt values; set-level metrics: the seeded resampling
        estimate of :mod:`layerwatch.metrics.uncertainty`. A metric of the run without standard errors (e.g. from
        an older version) gives all NaN; a name the run does not know raises KeyError.
        """
        if name in self._stderr:
            return self._stderr[name]
        if name not in self._values:
            raise KeyError(f"metric {name!r} is not in this run; it has {self.metrics}")
        return np.full(self._values[name].shape, np.nan)

    def per_prompt(self, name: str, step: int | None = None) -> np.ndarray:
        """``[layers, prompts]`` per-prompt values of ``name`` at ``step`` (default: the last probed step)."""
        if not self.records:
            raise ValueError(f"{self.logdir} has no JSONL records; per-prompt values are only stored there")
        record = self.records[-1] if step is None else next((r for r in self.records if r.step == step), None)
        if record is None:
            raise KeyError(f"step {step} is not in this run; steps are {self.steps.tolist()}")
        if name not in record.per_prompt:
            raise KeyError(f"no per-prompt values of {name!r}; available: {sorted(record.per_prompt)}")
        return np.asarray(record.per_prompt[name], dtype=np.float64)

    def to_pandas(self) -> Any:
        """A long-format ``pandas.DataFrame`` with columns step, layer, metric, value."""
        try:
            import pandas as pd
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("Run.to_pandas() needs pandas: pip install pandas") from error
        rows = [
            (int(step), int(layer), name, float(values[i, j]))
            for name, values in self._values.items()
            for i, step in enumerate(self.steps)
            for j, layer in enumerate(self.layers)
        ]
        return pd.DataFrame(rows, columns=["step", "layer", "metric", "value"])

    def __repr__(self) -> str:
        return f"Run({str(self.logdir)!r}, steps={len(self.steps)}, layers={len(self.layers)}, metrics={self.metrics})"


def _from_records(logdir: Path, records: list[ProbeRecord]) -> Run:
    by_step: dict[int, ProbeRecord] = {}
    for record in records:  # a step written twice (resume without purge): the later record wins
        by_step[record.step] = record
    ordered = [by_step[s] for s in sorted(by_step)]
    layers = sorted({layer for r in ordered for layer in r.layers})
    column = {layer: j for j, layer in enumerate(layers)}
    names: list[str] = []
    for record in ordered:
        names.extend(n for n in record.metrics if n not in names)
    values = {name: np.full((len(ordered), len(layers)), np.nan) for name in names}
    stderr: dict[str, np.ndarray] = {}
    for i, record in enumerate(ordered):
        for name, per_layer in record.metrics.items():
            for layer, value in zip(record.layers, per_layer):
                values[name][i, column[layer]] = value
        for name, per_layer in record.stderr.items():
            errors = stderr.setdefault(name, np.full((len(ordered), len(layers)), np.nan))
            for layer, value in zip(record.layers, per_layer):
                errors[i, column[layer]] = value
    scalars = {PROBE_SECONDS: np.array([r.wall_time_s for r in ordered], dtype=np.float64)}
    for i, record in enumerate(ordered):
        for name, value in record.scalars.items():
            scalars.setdefault(name, np.full(len(ordered), np.nan))[i] = value
    return Run(logdir, ordered, values, [r.step for r in ordered], layers, scalars, stderr)


def _from_event_files(logdir: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[tuple[str, int], dict[int, float]] = {}
    errors: dict[tuple[str, int], dict[int, float]] = {}  # standard errors: layer_NN/layerwatch_stderr/<metric>
    scalar_points: dict[str, dict[int, float]] = {}
    scalar_names = (*registry.scalar_metrics(), PROBE_SECONDS, ERRORS)
    scalar_tags = {f"{SCALAR_PREFIX}/{name}": name for name in scalar_names}
    event_dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    for directory in event_dirs:
        layer_dir = _LAYER_RUN.match(directory.name) if directory.parent == logdir else None
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if layer_dir is None and tag in scalar_tags:  # one number per probe: layerwatch/<name>
                for event in accumulator.Scalars(tag):
                    scalar_points.setdefault(scalar_tags[tag], {})[int(event.step)] = float(event.value)
                continue
            if layer_dir is not None:  # the layout with one TensorBoard run per layer: layer_NN/layerwatch/<metric>
                match = _METRIC_TAG.match(tag) or _STDERR_TAG.match(tag)
                key = None if match is None else (match["metric"], int(layer_dir["layer"]))
            else:  # the earlier layout: layerwatch/<metric>/layer_NN in the run itself
                match = _SCALAR_TAG.match(tag)
                key = None if match is None else (match["metric"], int(match["layer"]))
            if key is None:
                continue
            table = errors if tag.startswith(STDERR_PREFIX + "/") else series
            for event in accumulator.Scalars(tag):
                table.setdefault(key, {})[int(event.step)] = float(event.value)
    if not series:
        raise FileNotFoundError(
            f"{logdir} has neither {JSONL_NAME} nor TensorBoard scalars ('layer_<NN>/{SCALAR_PREFIX}/<metric>' or "
            f"'{SCALAR_PREFIX}/<metric>/layer_<NN>')"
        )
    steps = sorted({s for points in series.values() for s in points})
    layers = sorted({layer for _, layer in series})
    names: list[str] = []
    for name, _ in sorted(series, key=lambda k: k[1]):
        if name not in names:
            names.append(name)
    row, column = {s: i for i, s in enumerate(steps)}, {layer: j for j, layer in enumerate(layers)}
    values = {name: np.full((len(steps), len(layers)), np.nan) for name in names}
    stderr = {name: np.full((len(steps), len(layers)), np.nan) for name, _ in errors}
    for table, arrays in ((series, values), (errors, stderr)):
        for (name, layer), points in table.items():
            for step, value in points.items():
                if step in row and layer in column:
                    arrays[name][row[step], column[layer]] = value
    scalars = {name: np.array([points.get(step, np.nan) for step in steps]) for name, points in scalar_points.items()}
    if ERRORS in scalar_points:  # a running count: at a probe without a point (older runs wrote it only when it
        counted_at, counts = zip(*sorted(scalar_points[ERRORS].items()))  # changed), the last count at or before it
        last = np.searchsorted(counted_at, steps, side="right") - 1
        scalars[ERRORS] = np.where(last >= 0, np.asarray(counts)[np.maximum(last, 0)], 0.0)
    return Run(logdir, [], values, steps, layers, scalars, stderr)


class SeveralRunsError(ValueError):
    """A folder holds several runs; :func:`read_run` reads one run and never merges several.

    Attributes:
        runs: the run directories found, sorted.
    """

    def __init__(self, path: Path, runs: list[Path]) -> None:
        self.runs = runs
        listed = "\n".join(f"  {run}" for run in runs)
        super().__init__(
            f"{path} holds {len(runs)} layerwatch runs, and their steps would be mixed if read as one:\n{listed}\n"
            "read one of them (read_run(<run>), layerwatch report <run>), or compare them (layerwatch report RUN_A "
            "RUN_B ...)"
        )


def _has_layerwatch_scalars(event_file: Path) -> bool:
    """Whether a TensorBoard event file holds layerwatch tags (read from its first MiB; others, e.g. the Trainer's
    own logs, are not runs)."""
    try:
        with event_file.open("rb") as handle:
            return f"{SCALAR_PREFIX}/".encode() in handle.read(1 << 20)
    except OSError:
        return False


def find_runs(path: str | os.PathLike) -> list[Path]:
    """The layerwatch runs in ``path`` and its subfolders, sorted: every folder holding ``layerwatch.jsonl``, and
    every folder of layerwatch TensorBoard events outside those (a run's ``layer_<NN>/``, ``all_layers/`` and
    ``bimodality_threshold_5_9/`` subfolders belong to it)."""
    path = Path(path)
    with_jsonl = {p.parent for p in path.rglob(JSONL_NAME) if p.is_file()}
    tensorboard_only = set()
    for event_file in path.rglob("events.out.tfevents.*"):
        folder = event_file.parent
        root = folder.parent if RUN_SUBFOLDER.match(folder.name) and folder != path else folder
        if root in with_jsonl or any(run in root.parents for run in with_jsonl) or root in tensorboard_only:
            continue
        if _has_layerwatch_scalars(event_file):
            tensorboard_only.add(root)
    return sorted(with_jsonl | tensorboard_only)


def read_run(logdir: str | os.PathLike) -> Run:
    """Read a run directory written by layerwatch (training, Accelerate or ``layerwatch trajectory``).

    Reads ``layerwatch.jsonl`` when present (tolerating a truncated last line), otherwise the TensorBoard event
    files (for example a run written by hand with ``SummaryWriter`` under the same tag names): both the layout with
    one TensorBoard run per layer (``layer_NN/`` holding ``layerwatch/<metric>``) and the earlier one with
    ``layerwatch/<metric>/layer_NN`` tags in the run itself. Given a folder that is not a run itself, it reads the
    one run found below it (``Run.logdir`` says which, and it is logged); several runs are never merged:
    :class:`SeveralRunsError` lists them.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"run directory {str(logdir)!r} does not exist")
    records = read_jsonl_records(logdir / JSONL_NAME)
    if records:
        return _from_records(logdir, records)
    runs = find_runs(logdir)
    if len(runs) > 1:
        raise SeveralRunsError(logdir, runs)
    if runs and runs[0] != logdir:
        logger.info("%s is not a run itself; reading the one run in it, %s", logdir, runs[0])
        return read_run(runs[0])
    try:
        return _from_event_files(logdir)
    except FileNotFoundError:
        if (logdir / PROBE_FILENAME).is_file() or (logdir / JSONL_NAME).is_file():  # a run, without any record
            raise FileNotFoundError(
                f"{logdir} holds a layerwatch run ({PROBE_FILENAME}, {JSONL_NAME}) without any probe record: every "
                "probe of that run failed. The training log's warning 'layerwatch probe at step N failed (...)' names "
                f"the error (TensorBoard's {SCALAR_PREFIX}/errors counts them); fix it and run again"
            ) from None
        raise
