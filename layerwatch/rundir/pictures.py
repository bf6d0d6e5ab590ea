"""The TensorBoard pictures' bookkeeping: the growing layer x step history, when pictures are drawn, and the
background thread that draws them.

Disk use is bounded: a heatmap holds the whole history, so re-storing one at every probe stored the run's pictures
over and over (0.6-1 MiB per probe, about 2 GiB after 2,000 probes). The pictures are drawn at every one of the
first :data:`PICTURES_ALWAYS` probes, then at probe counts that grow by :data:`PICTURE_GROWTH` (so the newest
picture is never more than a quarter of the run behind: about 24 drawings in 200 probes, 34 in 2,000), and at
``close()`` for the last probe. The scalars, histograms and the JSONL keep every probe.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import numpy as np

from layerwatch.rundir.record import ProbeRecord

logger = logging.getLogger(__name__)

#: Pictures at each of the first this many probes ...
PICTURES_ALWAYS = 10
#: ... then whenever the probe count has grown by this factor since the last drawing.
PICTURE_GROWTH = 1.25
#: "spaced" (the schedule above) or "every" (a drawing at every probe, as before; for comparisons).
PICTURE_SCHEDULES = ("spaced", "every")
#: The schedule of writers not given one (``benchmarks/tensorboard_disk.py`` sets "every" to measure the old way).
PICTURE_SCHEDULE = "spaced"


def picture_due(count: int, schedule: str = "spaced") -> bool:
    """Whether the pictures are drawn at the ``count``-th probe of a run (1-based) under ``schedule``."""
    if schedule == "every" or count <= PICTURES_ALWAYS:
        return True

    def band(n: int) -> int:
        return math.floor(math.log(n / PICTURES_ALWAYS) / math.log(PICTURE_GROWTH) + 1e-9)

    return band(count) > band(count - 1)


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

    matplotlib takes about 0.1 s per picture and a run draws two per metric: 2-3 s per drawing for the "paper"
    preset, which would otherwise stop the training loop on the main process (and, in a distributed run, every other
    rank at its next collective). Each job holds copies of what it draws. The training thread waits only when
    :data:`PICTURE_BACKLOG` records' pictures are still queued. A job's error is raised by the next :meth:`submit`,
    :meth:`wait` or :meth:`close` (never printed from the thread), so the writer group handles it like any other
    writer failure.
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


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard's own writer threads: their errors reach the training thread at the next write; never print them
# ---------------------------------------------------------------------------------------------------------------

_EVENT_THREADS: weakref.WeakSet = weakref.WeakSet()
_STARTING: list[set] = []  # the threads that existed when each SummaryWriter now being created was started
_previous_excepthook = None


@contextlib.contextmanager
def quiet_event_threads() -> Iterator[None]:
    """Create TensorBoard writers inside this: their writer threads are layerwatch's, and an error that kills one (a
    full disk) is logged at debug level instead of printed as a thread traceback, since TensorBoard raises it again
    on the training thread at the next write, where the writer group warns about it once."""
    global _previous_excepthook
    if threading.excepthook is not _quiet_excepthook:
        _previous_excepthook = threading.excepthook
        threading.excepthook = _quiet_excepthook
    before = set(threading.enumerate())
    _STARTING.append(before)
    try:
        yield
    finally:
        _STARTING.remove(before)
        _EVENT_THREADS.update(t for t in threading.enumerate() if t not in before and _is_event_thread(t))


def _is_event_thread(thread: threading.Thread) -> bool:
    return type(thread).__module__.startswith("tensorboard")


def _quiet_excepthook(args: threading.ExceptHookArgs) -> None:
    thread = args.thread
    ours = thread is not None and (
        thread in _EVENT_THREADS or (_is_event_thread(thread) and any(thread not in before for before in _STARTING))
    )
    if ours:
        logger.debug("layerwatch: TensorBoard writer thread %s stopped: %s: %s", thread.name,
                     getattr(args.exc_type, "__name__", args.exc_type), args.exc_value)
        return
    (_previous_excepthook or threading.__excepthook__)(args)
