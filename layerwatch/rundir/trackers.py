"""Writers that send layerwatch's scalars to the experiment trackers a training run already reports to.

The Hugging Face ``Trainer`` callback follows ``TrainingArguments.report_to``: when it names ``wandb`` or ``mlflow``
and that tracker has an active run (the Trainer's own ``WandbCallback`` / ``MLflowCallback`` start it at
``on_train_begin``, before layerwatch's callback), each probe record's scalars go to that run too: the same
``layerwatch/<metric>/layer_<NN>`` names as in TensorBoard, plus ``layerwatch/probe_seconds`` and
``layerwatch/errors``, on the Trainer's global step. Nothing goes to ``state.log_history``.

Per-prompt histograms, heatmaps and alerts stay in layerwatch's own TensorBoard files and JSONL. A tracker that
fails to take a record logs one warning; the record is still written to the run directory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from layerwatch.rundir.record import PROBE_SECONDS, SCALAR_PREFIX, ProbeRecord
from layerwatch.rundir.writers import Writer

logger = logging.getLogger(__name__)

__all__ = ["WandbWriter", "MlflowWriter", "tracker_writers", "SUPPORTED"]

#: The ``report_to`` names that layerwatch follows.
SUPPORTED = ("wandb", "mlflow")

# WandbCallback plots every key against this one (define_metric("*", step_metric=...)).
WANDB_STEP_KEY = "train/global_step"


def record_scalars(record: ProbeRecord) -> dict[str, float]:
    """The record's flat per-layer scalars plus ``layerwatch/probe_seconds``."""
    values = {key: float(value) for key, value in record.flat_scalars().items()}
    values[f"{SCALAR_PREFIX}/{PROBE_SECONDS}"] = float(record.wall_time_s)
    return values


class _TrackerWriter(Writer):
    """Shared behaviour: a failing tracker warns once and never stops the other writers or training."""

    name = "tracker"

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    def write(self, record: ProbeRecord) -> None:
        self._send(record_scalars(record), int(record.step))

    def write_errors(self, step: int, total_errors: int) -> None:
        """The running count of failed probes, as ``layerwatch/errors``."""
        self._send({f"{SCALAR_PREFIX}/errors": float(total_errors)}, int(step))

    def close(self) -> None:
        """Nothing to close: the run belongs to the Trainer's own tracker callback."""

    def _send(self, values: dict[str, float], step: int) -> None:
        try:
            self._log(values, step)
        except Exception as error:  # noqa: BLE001 - a tracker problem must not cost the local record
            if not self._warned:
                self._warned = True
                logger.warning("layerwatch: could not log to %s at step %d (%s); carrying on", self.name, step, error)

    def _log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError


class WandbWriter(_TrackerWriter):
    """Logs to a W&B run, keyed to the Trainer's step the way ``WandbCallback`` does (``train/global_step``).

    W&B's own ``step`` must only grow and counts the Trainer's log calls, so the Trainer's step goes in the row.
    """

    name = "wandb"

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run

    def _log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, WANDB_STEP_KEY: step})


class MlflowWriter(_TrackerWriter):
    """Logs to one MLflow run (by id, so a run started later in the process does not receive them)."""

    name = "mlflow"

    def __init__(self, run_id: str) -> None:
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()

    def _log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])


def tracker_writers(report_to: str | Iterable[str] | None) -> list[_TrackerWriter]:
    """Writers for the trackers in ``report_to`` (as in ``TrainingArguments``) that have an active run now."""
    names = _names(report_to)
    writers: list[_TrackerWriter] = []
    if "wandb" in names:
        run = _active_wandb_run()
        if run is not None:
            writers.append(WandbWriter(run))
    if "mlflow" in names:
        run_id = _active_mlflow_run_id()
        if run_id is not None:
            writers.append(MlflowWriter(run_id))
    if writers:
        logger.info("layerwatch: also logging scalars to %s", ", ".join(writer.name for writer in writers))
    return writers


def _names(report_to: str | Iterable[str] | None) -> set[str]:
    if report_to is None:
        return set()
    if isinstance(report_to, str):
        report_to = [report_to]
    names = {str(name) for name in report_to}
    return set(SUPPORTED) if "all" in names else names


def _active_wandb_run() -> Any:
    import sys

    wandb = sys.modules.get("wandb")  # the Trainer's WandbCallback has imported it if it started a run
    return getattr(wandb, "run", None) if wandb is not None else None


def _active_mlflow_run_id() -> str | None:
    import sys

    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    info: Mapping[str, Any] | Any = getattr(run, "info", None)
    return getattr(info, "run_id", None)
