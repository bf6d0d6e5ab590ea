"""Where probe records go: the :class:`Writer` base class and its two backends.

A writer has ``write(record)``, ``write_errors(step, total_errors)`` (a no-op unless overridden) and ``close()``.

- :class:`JsonlWriter`: ``layerwatch.jsonl``, one record per line, appended and flushed per probe (the source of truth
  that :func:`layerwatch.read_run` reads).
- :class:`TensorBoardWriter`: one TensorBoard run per layer (``layer_NN/``, a scalar per metric and histograms of the
  per-prompt values the registry keeps), and in the run itself a custom-scalars layout with one chart per metric,
  a layer x step heatmap (grown one column per probe) and a depth-profile image per metric, alerts as text, and the
  running count of failed probes. The pictures are drawn on a background thread (:class:`PictureThread`).

Which writers a run directory gets, the file names and the one-writer rule live in :mod:`layerwatch.rundir.claim`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from layerwatch.metrics import names, registry
from layerwatch.rundir import images, jsonl
from layerwatch.rundir import pictures as pictures_module
from layerwatch.rundir.files import ALL_LAYERS_RUN, THRESHOLD_RUN, open_run_file, real_folder, write_atomically
from layerwatch.rundir.jsonl import read_jsonl_records  # noqa: F401 - re-exported (its earlier home)
from layerwatch.rundir.pictures import (  # noqa: F401 - re-exported (their earlier home)
    PICTURE_BACKLOG,
    PICTURE_EXIT_WAIT_S,
    PICTURE_SCHEDULES,
    HeatmapHistory,
    PictureThread,
    picture_due,
    quiet_event_threads,
)
from layerwatch.rundir.record import ERRORS, PROBE_SECONDS, SCALAR_PREFIX, ProbeRecord, layer_run, metric_tag, stderr_tag

logger = logging.getLogger(__name__)


class Writer:
    """Receives every probe record on the main process. Subclass it and override :meth:`write`.

    ``LayerWatch(writers=[...])`` also takes any object with ``write(record)`` and ``close()`` methods.
    """

    def write(self, record: ProbeRecord) -> None:
        """Store or forward one probe record."""
        raise NotImplementedError(f"{type(self).__name__} must implement write(record)")

    def write_errors(self, step: int, total_errors: int) -> None:
        """The running count of failed probes after a failure at ``step`` (ignored unless overridden)."""

    def close(self) -> None:
        """Flush and release what the writer holds (safe to call twice)."""

    #: "record" (default): writes records somewhere; "run-file": writes a file of the run directory; "claim": holds
    #: the run directory (released when no "run-file" writer is left, see :class:`WriterGroup`).
    role = "record"


class WriterGroup:
    """A monitor's writers. A writer that raises (a full or read-only disk, a tracker gone) is counted in
    :attr:`error_count`, warned about once, closed and dropped; the other writers keep writing and nothing reaches the
    training loop, unless ``strict``. A writer failing is never a failed probe. When no writer writes the run directory
    any more, its claim (the one-writer lock) is released too.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.writers: list[Writer] = []
        self.strict = strict
        self.error_count = 0

    def add(self, *writers: Writer) -> None:
        """Send future records to ``writers`` too."""
        self.writers.extend(writers)

    def write(self, record: ProbeRecord) -> None:
        """``write(record)`` on every live writer."""
        for writer in list(self.writers):
            self._guard(writer, "write", record.step, lambda: writer.write(record))

    def write_errors(self, step: int, total_errors: int) -> None:
        """``write_errors`` on every live writer that has it."""
        for writer in list(self.writers):
            write_errors = getattr(writer, "write_errors", None)
            if write_errors is not None:
                self._guard(writer, "write_errors", step, lambda: write_errors(step, total_errors))

    def close(self) -> None:
        """Close every writer; a failure is counted and warned about (raised afterwards when ``strict``)."""
        writers, self.writers = self.writers, []
        failure: Exception | None = None
        for writer in writers:
            try:
                writer.close()
            except Exception as error:  # noqa: BLE001 - closing must reach every writer
                self._warn(writer, "close", None, error)
                failure = failure or error
        if failure is not None and self.strict:
            raise failure

    def _guard(self, writer: Writer, what: str, step: int, call) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - a writer must not kill training
            self._warn(writer, what, step, error)
            self._drop(writer)
            if self.strict:
                raise

    def _warn(self, writer: Writer, what: str, step: int | None, error: Exception) -> None:
        self.error_count += 1
        at = "" if step is None else f" at step {step}"
        logger.warning(
            "layerwatch: the %s writer failed in %s%s (%s: %s); it is closed and gets no further records. The probes go "
            "on and the other writers keep writing; this is not a failed probe (strict=True raises instead)",
            type(writer).__name__, what, at, type(error).__name__, error,
        )

    def _drop(self, writer: Writer) -> None:
        self.writers.remove(writer)
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - it already failed; closing is best effort
            logger.debug("closing the failed writer %r failed too", writer, exc_info=True)
        if not any(getattr(s, "role", "record") == "run-file" for s in self.writers):
            for claim in [s for s in self.writers if getattr(s, "role", "record") == "claim"]:
                self.writers.remove(claim)
                claim.close()  # nothing writes the run directory any more: another writer may have it


def check_writers(writers: list[Any]) -> list[Any]:
    """``writers`` itself; TypeError naming ``writers=`` when one lacks ``write(record)`` or ``close()``."""
    for writer in writers:
        if not (callable(getattr(writer, "write", None)) and callable(getattr(writer, "close", None))):
            raise TypeError(
                f"writers= holds {writer!r}, which has no write(record) and close() methods; subclass layerwatch.rundir.writers.Writer"
            )
    return writers


class JsonlWriter(Writer):
    """Appends one JSON object per probe to ``path`` and flushes it to disk.

    Args:
        path: the JSONL file (opened never through a symbolic link: a link there is replaced by a real file).
        resume_step: when a run resumes from a checkpoint at this step, records with a larger step (written after
            the checkpoint by the interrupted run) are dropped so the series has no duplicate steps. A truncated
            last line is dropped too; other lines that are not records are kept as they are (readers skip them).

    A record whose line would be longer than :data:`layerwatch.rundir.jsonl.MAX_LINE_BYTES` (which readers skip) is
    written without its per-prompt values, with a warning.
    """

    role = "run-file"

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._warned_long = False
        self._clean_existing(resume_step)
        handle = open_run_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._handle = os.fdopen(handle, "a", encoding="utf-8")

    def _clean_existing(self, resume_step: int | None) -> None:
        if self.path.is_symlink() or not self.path.is_file() or self.path.stat().st_size == 0:
            return  # (a link is replaced by open_run_file, never read or rewritten)
        lines, dropped, rewrite = jsonl.kept_lines(self.path, resume_step)
        if not rewrite:
            return
        # The old file stays intact until the new one is complete and on disk.
        write_atomically(self.path, b"".join(line + b"\n" for line in lines))
        if dropped:
            logger.info("%s: dropped %d records after resume step %s", self.path, dropped, resume_step)

    def write(self, record: ProbeRecord) -> None:
        line = record.to_json()
        if len(line) > jsonl.MAX_LINE_BYTES // 4 and len(line.encode("utf-8")) > jsonl.MAX_LINE_BYTES:
            line = dataclasses.replace(record, per_prompt={}).to_json()
            if not self._warned_long:
                self._warned_long = True
                logger.warning(
                    "layerwatch: the record of step %d is longer than the %d MiB line cap of %s with its per-prompt "
                    "values; they are left out of this file (the metrics are all kept)", record.step,
                    jsonl.MAX_LINE_BYTES >> 20, self.path.name,
                )
        self._handle.write(line + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


NO_ALERTS = (
    "No alerts (checked at step {step}). layerwatch writes here when activations become non-finite, when a prompt or "
    "dataset entropy collapses, or when a layer's per-prompt prompt entropy looks bimodal."
)
NO_NEW_ALERTS = "No new alerts (checked at step {step}); {count} earlier alert(s), the last at step {last_step}: {last}"
#: Sarle's bimodality coefficient of a uniform distribution: above it, two modes are likely (drawn as a line in the
#: bimodality chart, from the :data:`layerwatch.rundir.files.THRESHOLD_RUN` run).
BIMODALITY_THRESHOLD = 5 / 9


def _summary_writer(path: Path, purge_step: int | None) -> Any:
    """A ``SummaryWriter`` in the real folder ``path`` (never through a link), whose writer thread prints nothing."""
    from torch.utils.tensorboard import SummaryWriter

    with quiet_event_threads():
        return SummaryWriter(log_dir=str(real_folder(path)), purge_step=purge_step)


class TensorBoardWriter(Writer):
    """Writes probe records as TensorBoard events: one TensorBoard run per layer, so every layer is its own line.

    Layout (``logdir`` is the run directory; ``NN`` the zero-padded layer):

    - ``logdir/layer_NN/``: scalar ``layerwatch/<metric>`` for every metric, its standard error
      ``layerwatch_stderr/<metric>`` (a section of its own; finite values only), and histograms
      ``layerwatch/<metric>_per_prompt`` of the per-prompt values the registry keeps. TensorBoard colours and lists
      each ``layer_NN`` run separately, so a chart of ``layerwatch/<metric>`` holds every layer as its own line.
    - ``logdir/all_layers/``: what concerns all layers at once: the custom-scalars layout (one chart per metric),
      ``layerwatch/probe_seconds``, ``layerwatch/errors`` (the running count of failed probes, 0 from the first
      probe), the single-number metrics (``best_layer``), the heatmap and depth-profile images per metric (drawn on
      a schedule that bounds disk use, see :mod:`layerwatch.rundir.pictures`), and the ``layerwatch/alerts`` text,
      written at every probe ("No alerts (checked at step N)" when there are none).
    - ``logdir/bimodality_threshold_5_9/``: the constant 5/9 under the bimodality tag, a line in its chart.

    Args:
        logdir: the run directory.
        purge_step: on resume, the first step to write again; events at or after it from the interrupted run are
            hidden by TensorBoard (``SummaryWriter(purge_step=...)``), in every run of the layout.
        history: records already in the run (on resume), so heatmaps show the whole series.
        pictures: ``"spaced"`` (see :mod:`layerwatch.rundir.pictures`) or ``"every"`` (every probe); default
            :data:`layerwatch.rundir.pictures.PICTURE_SCHEDULE` ("spaced").
    """

    role = "run-file"

    def __init__(
        self, logdir: str | os.PathLike, *, purge_step: int | None = None, history: list[ProbeRecord] | None = None,
        pictures: str | None = None,
    ) -> None:
        pictures = pictures_module.PICTURE_SCHEDULE if pictures is None else pictures
        if pictures not in PICTURE_SCHEDULES:
            raise ValueError(f"pictures= must be one of {PICTURE_SCHEDULES}, got {pictures!r}")
        self.logdir = Path(logdir)
        self.schedule = pictures
        self._purge_step = purge_step
        self._writer = _summary_writer(self.logdir / ALL_LAYERS_RUN, purge_step)
        self._layer_writers: dict[Any, Any] = {}
        self._history = HeatmapHistory()
        self._errors = 0
        self._started = False
        self._alerts_seen = [alert for record in history or [] for alert in record.alerts]
        self._last: tuple[ProbeRecord, int] | None = None  # the last record, and the history size it left
        self._drawn_at = 0  # the history size at the last drawing
        self._pictures = PictureThread(f"layerwatch-pictures-{self.logdir.name}")
        for record in history or []:
            self._history.add(record)

    def _layer_writer(self, layer: int | str) -> Any:
        """The writer of one layer's run (``layer_NN``), or of the threshold run (``layer=THRESHOLD_RUN``)."""
        if layer not in self._layer_writers:
            folder = layer if isinstance(layer, str) else layer_run(layer)
            self._layer_writers[layer] = _summary_writer(self.logdir / folder, self._purge_step)
        return self._layer_writers[layer]

    def _start(self, record: ProbeRecord) -> None:
        """At this writer's first record: the custom-scalars layout."""
        charts = {name: ["Multiline", [f"^{re.escape(metric_tag(name))}$"]] for name in record.metrics}
        self._writer.add_custom_scalars({SCALAR_PREFIX: charts})
        self._started = True

    def _write_layers(self, record: ProbeRecord) -> None:
        for index, layer in enumerate(record.layers):
            writer = self._layer_writer(layer)
            for name, values in record.metrics.items():
                if index < len(values):
                    writer.add_scalar(metric_tag(name), float(values[index]), record.step)
            for name, errors in record.stderr.items():  # standard errors: their own section, layerwatch_stderr/
                if index < len(errors) and math.isfinite(errors[index]):
                    writer.add_scalar(stderr_tag(name), float(errors[index]), record.step)
            for name in registry.histogram_metrics():  # the per-prompt values the record keeps
                rows = record.per_prompt.get(name, [])
                finite = np.asarray(rows[index] if index < len(rows) else [], dtype=np.float64)
                finite = finite[np.isfinite(finite)]
                if finite.size:
                    writer.add_histogram(f"{metric_tag(name)}_per_prompt", finite, record.step)
            writer.flush()
        if names.PROMPT_ENTROPY_BIMODALITY in record.metrics:  # the 5/9 line of the bimodality chart
            threshold = self._layer_writer(THRESHOLD_RUN)
            threshold.add_scalar(metric_tag(names.PROMPT_ENTROPY_BIMODALITY), BIMODALITY_THRESHOLD, record.step)
            threshold.flush()

    def alerts_text(self, record: ProbeRecord) -> str:
        """The alerts text at ``record``'s step: its new alerts (one per line), else that there are none."""
        if record.alerts:
            return "\n\n".join(str(alert) for alert in record.alerts)
        if not self._alerts_seen:
            return NO_ALERTS.format(step=record.step)
        last = self._alerts_seen[-1]
        return NO_NEW_ALERTS.format(
            step=record.step, count=len(self._alerts_seen), last_step=getattr(last, "step", "?"), last=last
        )

    def write(self, record: ProbeRecord) -> None:
        writer = self._writer
        if not self._started:
            self._start(record)
        self._history.add(record)
        self._write_layers(record)
        writer.add_scalar(f"{SCALAR_PREFIX}/{PROBE_SECONDS}", record.wall_time_s, record.step)
        writer.add_scalar(f"{SCALAR_PREFIX}/{ERRORS}", self._errors, record.step)  # at every probe: a line to the last
        for name, value in record.scalars.items():  # one number per probe (best_layer)
            writer.add_scalar(f"{SCALAR_PREFIX}/{name}", value, record.step)
        writer.add_text(f"{SCALAR_PREFIX}/alerts", self.alerts_text(record), record.step)
        self._alerts_seen.extend(record.alerts)
        writer.flush()
        count = len(self._history.steps)
        self._last = (record, count)
        if picture_due(count, self.schedule):
            self._submit_pictures(record)

    def _submit_pictures(self, record: ProbeRecord) -> None:
        self._drawn_at = len(self._history.steps)
        self._pictures.submit(self._picture_job(record))

    def _picture_job(self, record: ProbeRecord) -> Callable[[], None]:
        """Draws ``record``'s heatmaps (the history so far) and depth profiles, from copies taken now."""
        writer, step, layers, steps = self._writer, record.step, list(record.layers), list(self._history.steps)
        heatmaps = {name: self._history.matrix(name).copy() for name in record.metrics}
        profiles = {name: np.array(values, dtype=np.float64) for name, values in record.metrics.items()}

        def draw() -> None:
            for name, matrix in heatmaps.items():
                picture = images.heatmap(matrix, steps, layers, metric=name)
                writer.add_image(f"{SCALAR_PREFIX}/heatmap/{name}", picture, step, dataformats="HWC")
                profile = images.depth_profile(profiles[name], layers, metric=name, step=step)
                writer.add_image(f"{SCALAR_PREFIX}/depth_profile/{name}", profile, step, dataformats="HWC")
            writer.flush()

        return draw

    def write_errors(self, step: int, total_errors: int) -> None:
        """The running count of failed probes, as ``layerwatch/errors``."""
        self._errors = int(total_errors)
        self._writer.add_scalar(f"{SCALAR_PREFIX}/{ERRORS}", total_errors, step)
        self._writer.flush()

    def close(self) -> None:
        try:
            try:
                if self._last is not None and self._drawn_at != self._last[1] and self._writer is not None:
                    self._submit_pictures(self._last[0])  # the last probe's pictures, when the schedule skipped it
            finally:
                self._last = None
                self._pictures.close()  # the pictures still being drawn first; a drawing error is raised after
        finally:
            writers, self._layer_writers = list(self._layer_writers.values()), {}
            if self._writer is not None:
                writers.append(self._writer)
                self._writer = None
            for writer in writers:
                writer.close()
