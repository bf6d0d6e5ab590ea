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

import atexit
import bisect
import logging
import os
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from layerwatch.rundir import images

from layerwatch.metrics import registry
from layerwatch.rundir.record import SCALAR_PREFIX, ProbeRecord, layer_run, metric_tag

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


def read_jsonl_records(path: str | os.PathLike) -> list[ProbeRecord]:
    """Records of a JSONL file in file order, skipping lines that do not parse (a crash mid-write truncates the last)."""
    records: list[ProbeRecord] = []
    path = Path(path)
    if not path.exists():
        return records
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(ProbeRecord.from_json(line))
            except (ValueError, KeyError, TypeError, AttributeError):  # a damaged or crafted line
                logger.warning("%s: skipping unreadable line %d (a run interrupted mid-write?)", path, number)
    return records


class JsonlWriter(Writer):
    """Appends one JSON object per probe to ``path`` and flushes it to disk.

    Args:
        path: the JSONL file.
        resume_step: when a run resumes from a checkpoint at this step, records with a larger step (written after
            the checkpoint by the interrupted run) are dropped so the series has no duplicate steps. A truncated
            last line is dropped too.
    """

    role = "run-file"

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clean_existing(resume_step)
        self._handle = self.path.open("a", encoding="utf-8")

    def _clean_existing(self, resume_step: int | None) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        text = self.path.read_text(encoding="utf-8")
        records = read_jsonl_records(self.path)
        kept = [r for r in records if resume_step is None or r.step <= resume_step]
        lines = [line for line in text.splitlines() if line.strip()]
        if len(kept) == len(lines) and text.endswith("\n"):
            return
        from layerwatch.rundir.files import write_atomically

        # The old file stays intact until the new one is complete and on disk.
        write_atomically(self.path, "".join(r.to_json() + "\n" for r in kept).encode("utf-8"))
        if len(kept) < len(records):
            logger.info("%s: dropped %d records after resume step %s", self.path, len(records) - len(kept), resume_step)

    def write(self, record: ProbeRecord) -> None:
        self._handle.write(record.to_json() + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


class HeatmapHistory:
    """Per metric, the ``[layers, steps]`` values of every probe so far, grown by one column per probe.

    A step seen again replaces its column (a resumed run that was not purged); an earlier step is inserted in order.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self._values: dict[str, np.ndarray] = {}  # [layers, capacity], NaN-filled beyond the columns in use
        self._layers = 0

    def add(self, record: ProbeRecord) -> None:
        if len(record.layers) != self._layers:  # (never within one run) start over with the new depth
            self.steps, self._values, self._layers = [], {}, len(record.layers)
        column = bisect.bisect_left(self.steps, record.step)
        if column == len(self.steps) or self.steps[column] != record.step:
            self.steps.insert(column, record.step)
            for name in self._values:
                self._make_room(name, column)
        for name, values in self._values.items():
            values[:, column] = np.nan
        for name, per_layer in record.metrics.items():
            if name not in self._values:
                self._values[name] = np.full((self._layers, max(8, len(self.steps))), np.nan)
            self._values[name][:, column] = per_layer

    def _make_room(self, name: str, column: int) -> None:
        values, used = self._values[name], len(self.steps) - 1
        if used == values.shape[1]:
            values = np.concatenate([values, np.full_like(values, np.nan)], axis=1)
            self._values[name] = values
        values[:, column + 1 : used + 1] = values[:, column:used].copy()

    def matrix(self, name: str) -> np.ndarray:
        """``[layers, steps]`` values of ``name`` (NaN where a probe did not record it)."""
        return self._values[name][:, : len(self.steps)]


#: Records whose pictures may wait for the drawing thread; a probe beyond that waits until one is drawn.
PICTURE_BACKLOG = 2
#: At interpreter exit, how long the pictures still being drawn are waited for (a run that never called close()).
PICTURE_EXIT_WAIT_S = 60.0

_PICTURE_THREADS: weakref.WeakSet = weakref.WeakSet()


class PictureThread:
    """Runs a TensorBoard writer's drawing jobs on one background thread, in the order they were submitted.

    matplotlib takes about 0.1 s per picture and a run draws two per metric at every probe: 2-3 s per probe for the
    "paper" preset, which would otherwise stop the training loop on the main process (and, in a distributed run,
    every other rank at its next collective). Each job holds copies of what it draws. The training thread waits only
    when :data:`PICTURE_BACKLOG` records' pictures are still queued. A job's error is raised by the next
    :meth:`submit`, :meth:`wait` or :meth:`close`, so the writer group handles it like any other writer failure.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.Queue = queue.Queue(maxsize=PICTURE_BACKLOG)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        _PICTURE_THREADS.add(self)

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; wait first if the backlog is full."""
        self._raise_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is done (at most ``timeout`` seconds); raise a job's error, if any.
        Returns whether all were done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._jobs.all_tasks_done:
            while self._jobs.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._jobs.all_tasks_done.wait(remaining)
            done = not self._jobs.unfinished_tasks
        self._raise_error()
        return done

    def close(self) -> None:
        """Wait for every job, then end the thread."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
            _PICTURE_THREADS.discard(self)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure the writer is being dropped: skip the rest
                    job()
            except BaseException as error:  # noqa: BLE001 - handed to the training thread
                self._error = error
            finally:
                self._jobs.task_done()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


@atexit.register
def _draw_pending_pictures_at_exit() -> None:
    """A script that never closes its monitor still gets the pictures of its last probes."""
    for pictures in list(_PICTURE_THREADS):
        try:
            if not pictures.wait(PICTURE_EXIT_WAIT_S):
                logger.warning("layerwatch: gave up drawing TensorBoard pictures at exit after %.0f s", PICTURE_EXIT_WAIT_S)
        except Exception as error:  # noqa: BLE001 - exiting anyway
            logger.warning("layerwatch: drawing TensorBoard pictures failed at exit (%s: %s)", type(error).__name__, error)


NO_ALERTS = (
    "No alerts so far (step {step}). layerwatch writes here when activations become non-finite, when a prompt or "
    "dataset entropy collapses, or when a layer's per-prompt prompt entropy looks bimodal."
)


class TensorBoardWriter(Writer):
    """Writes probe records as TensorBoard events: one TensorBoard run per layer, so every layer is its own line.

    Layout (``logdir`` is the run directory; ``NN`` the zero-padded layer):

    - ``logdir/layer_NN/``: scalar ``layerwatch/<metric>`` for every metric, and histograms
      ``layerwatch/<metric>_per_prompt`` of the per-prompt values the registry keeps. TensorBoard colours and lists
      each ``layer_NN`` run separately, so a chart of ``layerwatch/<metric>`` holds every layer as its own line.
    - ``logdir/``: the custom-scalars layout (one chart per metric), ``layerwatch/probe_seconds``,
      ``layerwatch/errors`` (the running count of failed probes, 0 from the first probe), the heatmap and
      depth-profile images per metric, and ``layerwatch/alerts`` text ("no alerts so far" at the first probe).

    Args:
        logdir: the run directory.
        purge_step: on resume, the first step to write again; events at or after it from the interrupted run are
            hidden by TensorBoard (``SummaryWriter(purge_step=...)``), in every layer's run too.
        history: records already in the run (on resume), so heatmaps show the whole series.
    """

    role = "run-file"

    def __init__(
        self, logdir: str | os.PathLike, *, purge_step: int | None = None, history: list[ProbeRecord] | None = None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self._purge_step = purge_step
        self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step)
        self._layer_writers: dict[int, SummaryWriter] = {}
        self._history = HeatmapHistory()
        self._errors = 0
        self._started = False
        self._alerted_before = any(record.alerts for record in history or [])
        self._pictures = PictureThread(f"layerwatch-pictures-{self.logdir.name}")
        for record in history or []:
            self._history.add(record)

    def _layer_writer(self, layer: int):
        if layer not in self._layer_writers:
            from torch.utils.tensorboard import SummaryWriter

            path = self.logdir / layer_run(layer)
            self._layer_writers[layer] = SummaryWriter(log_dir=str(path), purge_step=self._purge_step)
        return self._layer_writers[layer]

    def _start(self, record: ProbeRecord) -> None:
        """At this writer's first record: the custom-scalars layout, the error count and the alerts text."""
        charts = {name: ["Multiline", [f"^{re.escape(metric_tag(name))}$"]] for name in record.metrics}
        self._writer.add_custom_scalars({SCALAR_PREFIX: charts})
        self._writer.add_scalar(f"{SCALAR_PREFIX}/errors", self._errors, record.step)
        if not record.alerts and not self._alerted_before:
            self._writer.add_text(f"{SCALAR_PREFIX}/alerts", NO_ALERTS.format(step=record.step), record.step)
        self._started = True

    def _write_layers(self, record: ProbeRecord) -> None:
        for index, layer in enumerate(record.layers):
            writer = self._layer_writer(layer)
            for name, values in record.metrics.items():
                if index < len(values):
                    writer.add_scalar(metric_tag(name), float(values[index]), record.step)
            for name in registry.histogram_metrics():  # the per-prompt values the record keeps
                rows = record.per_prompt.get(name, [])
                finite = np.asarray(rows[index] if index < len(rows) else [], dtype=np.float64)
                finite = finite[np.isfinite(finite)]
                if finite.size:
                    writer.add_histogram(f"{metric_tag(name)}_per_prompt", finite, record.step)
            writer.flush()

    def write(self, record: ProbeRecord) -> None:
        writer = self._writer
        if not self._started:
            self._start(record)
        self._history.add(record)
        self._write_layers(record)
        writer.add_scalar(f"{SCALAR_PREFIX}/probe_seconds", record.wall_time_s, record.step)
        for name, value in record.scalars.items():  # one number per probe (best_layer), in the run itself
            writer.add_scalar(f"{SCALAR_PREFIX}/{name}", value, record.step)
        for alert in record.alerts:
            writer.add_text(f"{SCALAR_PREFIX}/alerts", alert, record.step)
        writer.flush()
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
        self._writer.add_scalar(f"{SCALAR_PREFIX}/errors", total_errors, step)
        self._writer.flush()

    def close(self) -> None:
        try:
            self._pictures.close()  # the pictures still being drawn first; a drawing error is raised after closing
        finally:
            writers, self._layer_writers = list(self._layer_writers.values()), {}
            if self._writer is not None:
                writers.append(self._writer)
                self._writer = None
            for writer in writers:
                writer.close()
