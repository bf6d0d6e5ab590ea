"""The run directory: the names of its files, the sinks that write into it, and the one-writer rule.

A run directory (``logdir``) holds ``probe.safetensors`` (the run's probe, for resume and ``layerwatch trajectory``),
``layerwatch.jsonl`` (one record per probe; what :func:`layerwatch.read_run` reads) and TensorBoard event files.
:func:`open_sinks` is the one place that creates them for a monitor; one live TensorBoard writer per directory in
this process (two would interleave two event files that TensorBoard merges into one confusing series).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from layerwatch.sinks import JsonlSink, Sink, TensorBoardSink, read_jsonl_records

if TYPE_CHECKING:  # pragma: no cover
    from layerwatch.probe import Probe
    from layerwatch.record import ProbeRecord

logger = logging.getLogger(__name__)

JSONL_NAME = "layerwatch.jsonl"
PROBE_FILENAME = "probe.safetensors"

_LIVE_WRITER_DIRS: set[str] = set()
_LIVE_WRITER_LOCK = threading.Lock()


class WriterClaim(Sink):
    """This process's claim on a run directory; a sink that writes nothing and gives the claim back on close."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        key = str(Path(logdir).resolve())
        with _LIVE_WRITER_LOCK:
            if key in _LIVE_WRITER_DIRS:
                raise ValueError(
                    f"logdir={str(logdir)!r} already has a live layerwatch TensorBoard writer in this process; "
                    "close() the other LayerWatch first or give this one another logdir"
                )
            _LIVE_WRITER_DIRS.add(key)
        self._key: str | None = key

    def write(self, record: ProbeRecord) -> None:
        """Nothing: the claim only lives as long as the run's other sinks."""

    def close(self) -> None:
        if self._key is not None:
            with _LIVE_WRITER_LOCK:
                _LIVE_WRITER_DIRS.discard(self._key)
            self._key = None


def open_sinks(
    logdir: str | os.PathLike, probe: Probe, *, tensorboard: bool, jsonl: bool, resume_step: int | None
) -> list[Sink]:
    """Create ``logdir``, save the run's probe there and open its sinks (on the main process only).

    Args:
        logdir: the run directory (created if missing).
        probe: saved as ``probe.safetensors``.
        tensorboard, jsonl: which files to write.
        resume_step: the step a run resumed from: JSONL records after it are dropped and TensorBoard purges them.

    Raises:
        ValueError: ``logdir`` is not writable, or another live TensorBoard writer in this process writes there.
    """
    logdir = Path(logdir)
    claim = WriterClaim(logdir) if tensorboard else None
    sinks: list[Sink] = []
    try:
        try:
            logdir.mkdir(parents=True, exist_ok=True)
            probe.save(logdir / PROBE_FILENAME)
        except OSError as error:
            raise ValueError(f"logdir={str(logdir)!r} is not writable ({error}); pass a directory you can write to") from error
        history = [r for r in read_jsonl_records(logdir / JSONL_NAME) if resume_step is None or r.step <= resume_step]
        if history and resume_step is None:
            logger.info("%s already holds %d probe records; new records are appended", logdir, len(history))
        if jsonl:
            sinks.append(JsonlSink(logdir / JSONL_NAME, resume_step=resume_step))
        if claim is not None:
            purge = resume_step + 1 if resume_step is not None else None
            sinks.append(TensorBoardSink(logdir, purge_step=purge, history=history))
            sinks.append(claim)
        return sinks
    except BaseException:
        for sink in sinks:
            sink.close()
        if claim is not None:
            claim.close()  # safe twice
        raise
