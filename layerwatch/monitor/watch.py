"""The monitor: ``LayerWatch`` decides when to probe and runs one probe, top to bottom.

Path of the data (one probe, :meth:`LayerWatch.run` -> ``_probe``)::

    _validate                     the model can take the probe (vocabulary, positions); once per model
    Collector(metrics, probe)     buffers for what the selected metrics need (layerwatch.monitor.collect, from the registry)
    isolated(model)               eval + no_grad, RNG forked, flags restored, eager, FSDP2 resharded
      for each micro-batch of this rank's rows, pass by pass (clean batch, then each augmented view):
        model(**inputs)  ->  hooks deliver layer 0..L one at a time  ->  Collector.on_layer reduces each at once
    Collector.reduce_across_ranks agree on errors, then one packed all-reduce per kind (sum, max)
    set_level_metrics             per-layer values, a pure function of the reduced buffers
    ProbeRecord + alerts          ->  writers, on the main rank, after the probe (a WriterGroup: a failing writer is
                                      dropped and counted, never a failed probe; layerwatch.rundir.claim opens the run
                                      directory's writers)

The schedule (:class:`layerwatch.monitor.schedule.ProbeSchedule`) says when; :attr:`LayerWatch.last_outcome` says what the
last :meth:`~LayerWatch.step` or :meth:`~LayerWatch.run` call did.
"""

from __future__ import annotations

import enum
import logging
import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwatch import metrics as M
from layerwatch.metrics import registry
from layerwatch._version import __version__
from layerwatch.monitor.alerts import AlertTracker
from layerwatch.monitor.capture import LayerHooks, isolated, model_device
from layerwatch.monitor.collect import Collector, ProbeError, all_ranks_max, distributed, passes, set_level_metrics
from layerwatch.monitor.cost import check_probe_cost
from layerwatch.monitor.model_facts import ModelFacts, model_facts
from layerwatch.probe import Probe
from layerwatch.monitor.references import References
from layerwatch.rundir.record import ProbeRecord
from layerwatch.metrics.registry import resolve_metrics
from layerwatch.rundir.claim import open_writers
from layerwatch.monitor.schedule import ProbeSchedule, TrainingPace
from layerwatch.rundir.writers import Writer, WriterGroup, check_writers

logger = logging.getLogger(__name__)

__all__ = [
    "LayerWatch", "ProbeRecord", "ProbeError", "ProbeOutcome", "METRIC_PRESETS", "ALL_METRICS", "resolve_metrics",
    "all_ranks_max",
]

# Derived aliases of the built-in metrics (the registry, layerwatch.metrics.registry, is the live source).
METRIC_PRESETS: dict[str, tuple[str, ...]] = registry.metric_presets()
ALL_METRICS = registry.all_metrics()


DEFAULT_MEMORY_BUDGET = 2 << 30
"""Default ``memory_budget`` of :class:`LayerWatch`: 2 GiB for the set-level metrics' peak (about 7,000 prompts
with DiME)."""


def check_memory_budget(num_prompts: int, metric_names: Sequence[str], budget: int | None) -> None:
    """Refuse (ValueError) a probe whose set-level metrics would need more than ``budget`` bytes at their peak."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes or None (no check), got {budget!r}")
    estimate = M.set_level_peak_bytes(num_prompts, metric_names)
    if estimate > budget:
        heavy = [name for name in metric_names if M.set_level_peak_bytes(num_prompts, [name]) > 0]
        raise ValueError(
            f"a probe of {num_prompts} prompts needs about {estimate / 2**30:.1f} GiB for the M x M matrices of "
            f"{', '.join(heavy)} (and time growing like M^3), over memory_budget={budget / 2**30:.1f} GiB. Use fewer "
            f"prompts (num_prompts= when building the probe), metrics='light' (no M x M matrices), or raise "
            "memory_budget= (None turns the check off)"
        )


class ProbeOutcome(str, enum.Enum):
    """What the last :meth:`LayerWatch.step` / :meth:`LayerWatch.run` call did (compares equal to its value)."""

    NOT_DUE = "not due"  # step(): the schedule did not call for a probe at this step
    PROBED = "probed"  # a record was made
    FAILED = "failed"  # the probe failed (logged and counted in layerwatch/errors; strict=True raises)


def _check_arguments(probe: Any, alpha: Any, batch_size: Any, collapse_probes: Any) -> None:
    if not isinstance(probe, Probe):
        raise TypeError(
            f"probe must be a layerwatch.Probe, got {type(probe).__name__}; build one with Probe.from_texts, "
            "Probe.from_tensors or Probe.from_dataset"
        )
    check_options(alpha=alpha, batch_size=batch_size, collapse_probes=collapse_probes)


def _settings(watch: "LayerWatch", world: int) -> dict[str, Any]:
    """The settings a record carries, so that runs can be compared honestly."""
    return {
        "preset": watch.preset,
        "metrics": list(watch.metric_names),
        "alpha": watch.alpha,
        "views": watch.num_views,
        "infonce_temperature": 0.1,
        "lidar_delta": 1e-4,
        "dime_permutations": 10,
        "num_prompts": watch.probe.num_prompts,
        "batch_size": watch.batch_size,
        "world_size": world,
        "probe_hash": watch.probe.content_hash,
        "layerwatch_version": __version__,
    }


def _labelled_metrics(names: tuple[str, ...], probe: Probe, *, explicit: bool) -> tuple[str, ...]:
    """``names`` without the metrics that need labels when the probe has none (an explicit request is refused)."""
    if probe.labels is not None:
        return names
    needing = [name for name in names if registry.LABELS in registry.REGISTRY[name].needs]
    if needing and explicit:
        raise ValueError(
            f"metrics= includes {needing}, which need a probe with labels; build it with "
            "Probe.from_texts(..., labels=...), Probe.from_dataset(..., label_column=...) or "
            "Probe.from_tensors(..., labels=...)"
        )
    return tuple(name for name in names if name not in needing)


def check_options(
    *,
    alpha: float = 1.0,
    batch_size: int = 16,
    collapse_probes: int = 2,
    every: int | None = None,
    max_overhead: float | None = None,
    metrics: str | Sequence[str] | None = None,
) -> None:
    """Refuse :class:`LayerWatch` option values it cannot use (``ValueError`` naming the option).

    :class:`LayerWatch` checks ``alpha``, ``batch_size`` and ``collapse_probes`` here (its schedule and
    :func:`resolve_metrics` check the others as it builds them); the integrations call it with all six when they
    are built, before training, so that nothing is checked twice in different words.
    """
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"alpha must be a positive number (1 = von Neumann entropy), got {alpha!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer number of prompts per forward, got {batch_size!r}")
    if isinstance(collapse_probes, bool) or not isinstance(collapse_probes, int) or collapse_probes < 1:
        raise ValueError(f"collapse_probes must be a positive number of consecutive probes, got {collapse_probes!r}")
    if every is not None or max_overhead is not None:
        ProbeSchedule(every=1 if every is None else every, max_overhead=max_overhead)
    if metrics is not None:
        resolve_metrics(metrics)


class LayerWatch:
    """Probe a model's layers during training and log per-layer representation metrics.

    Args:
        probe: the fixed :class:`layerwatch.Probe` every probe runs.
        logdir: run directory for ``layerwatch.jsonl``, TensorBoard events and ``probe.safetensors``; ``None``
            writes nothing to disk (give ``writers=`` instead).
        every: probe every N optimizer steps.
        metrics: ``"light"``, ``"standard"`` (default), ``"paper"`` (LiDAR on 16 views) or a list of metric names.
        alpha: Rényi order of the matrix entropies (1 = von Neumann).
        layers: override block discovery: a dotted path (``"model.layers"``) or a list of modules.
        batch_size: prompts per probe forward; bounds the probe's memory.
        log_spaced_start: also probe at steps 1, 2, 4, ... below ``every``.
        probe_at_start: also probe at step 0.
        max_overhead: keep probe time below this fraction of training time by stretching the interval.
        strict: re-raise probe failures instead of logging them and carrying on.
        writers: extra writers (objects with ``write(record)`` and ``close()``), written on the main process.
        tensorboard, jsonl: write TensorBoard events / the JSONL file into ``logdir``.
        resume_step: the step a run resumed from: records after it are dropped and TensorBoard purges them.
        device: where probe inputs go; default the device of the model's first parameter.
        collapse_threshold: the floor of the normalized dataset entropy: at or below it (or effective rank at or
            below 1.5) at ``collapse_probes`` consecutive probes, a layer raises a collapse alert; layers with an
            attention sink are not judged (see :mod:`layerwatch.monitor.alerts` and the README).
        collapse_probes: consecutive probes at the floor before a collapse alert (default 2).
        seed: seeds DiME's permutations.
        memory_budget: bytes the set-level metrics may use at their peak (default 2 GiB; ``None``: no check). A
            probe whose estimate (:func:`layerwatch.metrics.set_level_peak_bytes`, the ``M x M`` matrices of DiME
            and InfoNCE) exceeds it is refused here, before any training step, with the estimate and the knobs.
    """

    def __init__(
        self,
        probe: Any,
        *,
        logdir: str | os.PathLike | None,
        every: int = 100,
        metrics: str | Sequence[str] = "standard",
        alpha: float = 1.0,
        layers: str | Sequence[nn.Module] | None = None,
        batch_size: int = 16,
        log_spaced_start: bool = True,
        probe_at_start: bool = False,
        max_overhead: float | None = None,
        strict: bool = False,
        writers: Sequence[Writer] | None = None,
        tensorboard: bool = True,
        jsonl: bool = True,
        resume_step: int | None = None,
        device: str | torch.device | None = None,
        collapse_threshold: float = 0.05,
        collapse_probes: int = 2,
        seed: int = 0,
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        _check_arguments(probe, alpha, batch_size, collapse_probes)
        self.schedule = ProbeSchedule(
            every=every, log_spaced_start=log_spaced_start, at_start=probe_at_start, max_overhead=max_overhead
        )
        self.preset, self.metric_names, lidar_views = resolve_metrics(metrics)
        self.metric_names = _labelled_metrics(self.metric_names, probe, explicit=not isinstance(metrics, str))
        check_memory_budget(probe.num_prompts, self.metric_names, memory_budget)
        if lidar_views and len(probe.views) < lidar_views:
            probe = probe.with_views(lidar_views)
        self.probe = probe
        self.num_views = lidar_views
        self.alpha = float(alpha)
        self.layers = layers
        self.batch_size = batch_size
        self.strict = strict
        self.device = torch.device(device) if device is not None else None
        self.seed = seed
        self.alerts = AlertTracker(collapse_threshold=collapse_threshold, collapse_probes=collapse_probes)
        self.logdir = Path(logdir) if logdir is not None else None
        self.error_count = 0
        self.last_outcome: ProbeOutcome | None = None
        self._warned_kinds: set[str] = set()
        self._validated: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # by identity, forgotten when freed
        self._pace = TrainingPace()
        self._writers = WriterGroup(strict=strict)
        if resume_step is not None:  # the same on every rank, so all ranks keep probing at the same steps
            self.schedule.last_step = resume_step
        if self.is_main_process:
            self._open_writers(list(writers or []), tensorboard, jsonl, resume_step)
        self.references = None
        if any(registry.REFERENCE in registry.REGISTRY[name].needs for name in self.metric_names):
            self.references = References(
                probe.series_hash(0), self.logdir, resume_step=resume_step, write=self.is_main_process
            )

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def is_main_process(self) -> bool:
        return distributed()[0] == 0

    @property
    def last_probed_step(self) -> int | None:
        return self.schedule.last_step

    def _open_writers(self, extra: list[Writer], tensorboard: bool, jsonl: bool, resume_step: int | None) -> None:
        self._writers.add(*check_writers(extra))
        if self.logdir is not None:
            self._writers.add(*open_writers(self.logdir, self.probe, tensorboard=tensorboard, jsonl=jsonl, resume_step=resume_step))

    def add_writer(self, writer: Writer) -> None:
        """Send future records to ``writer`` too (main process only)."""
        if self.is_main_process:
            self._writers.add(writer)

    # ------------------------------------------------------------------------------------------- schedule
    def should_probe(self, step: int) -> bool:
        """Whether :meth:`step` would probe at ``step`` (never twice for the same step)."""
        return self.schedule.is_due(step)

    def step(self, model: nn.Module, step: int) -> ProbeRecord | None:
        """Call once per optimizer step (on every rank); probes when the schedule says so.

        Returns the record, or ``None`` both when no probe was due and when it failed; :attr:`last_outcome` tells
        them apart (:class:`ProbeOutcome`).

        ``step`` must be the optimizer step count of the whole run, increasing by one per call (e.g.
        ``trainer.state.global_step``, or a counter you increment after each ``optimizer.step()``), never an epoch
        number or a batch index that restarts each epoch. A step at or before one already seen is never probed,
        and the first such call logs a warning.
        """
        previous = self._pace.observe(step)
        if previous is not None and step <= previous:
            self._warn_step_not_increasing(step, previous)
        if not self.should_probe(step):
            self.last_outcome = ProbeOutcome.NOT_DUE
            return None
        record = self.run(model, step)
        self._pace.restart(step)  # probe time is not training time
        return record

    def _warn_step_not_increasing(self, step: int, previous: int) -> None:
        if "step_not_increasing" in self._warned_kinds:
            return
        self._warned_kinds.add("step_not_increasing")
        logger.warning(
            "layerwatch: step() got step %d after step %d; steps must increase: pass the run's optimizer step count "
            "(e.g. trainer.state.global_step), not an epoch or a per-epoch batch index, and call step() once per "
            "optimizer step. Steps at or before one already seen are never probed (this warning is shown once)",
            step, previous,
        )

    # ---------------------------------------------------------------------------------------------- probe
    def run(self, model: nn.Module, step: int) -> ProbeRecord | None:
        """Probe ``model`` now and log the record as ``step``. On every rank in multi-process runs.

        Returns the record, or ``None`` when the probe failed (logged, counted in ``layerwatch/errors``); with
        ``strict=True`` the failure is raised instead. Sets :attr:`last_outcome`.
        """
        started = time.perf_counter()
        record = None
        self.last_outcome = ProbeOutcome.FAILED
        try:
            record = self._probe(model, step, started)
            self.last_outcome = ProbeOutcome.PROBED
        except Exception as error:  # the monitor must not kill training
            self._report_failure(step, error)
            if self.strict:
                raise
        finally:
            self.schedule.mark_probed(step)
        if record is not None and self.is_main_process:
            self._writers.write(record)  # a writer that fails is counted in writer_error_count, not as a failed probe
        self._stretch_schedule(time.perf_counter() - started)
        return record

    @property
    def writer_error_count(self) -> int:
        """How many times a writer failed (a full or read-only disk, ...); each failed writer is closed and dropped."""
        return self._writers.error_count

    def _report_failure(self, step: int, error: BaseException) -> None:
        self.error_count += 1
        kind = type(error).__name__
        if kind not in self._warned_kinds:
            self._warned_kinds.add(kind)
            logger.warning(
                "layerwatch probe at step %d failed (%s: %s); carrying on without it. Further %s failures are counted "
                "in layerwatch/errors without a warning (strict=True raises instead)", step, kind, error, kind,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
        self._writers.write_errors(step, self.error_count)

    def _stretch_schedule(self, probe_seconds: float) -> None:
        if self.schedule.max_overhead is None or self._pace.seconds_per_step is None:
            return
        gap = self.schedule.required_gap(probe_seconds, self._pace.seconds_per_step)
        self.schedule.min_gap = int(all_ranks_max(gap))  # every rank must probe at the same steps

    def _validate(self, model: nn.Module, facts: ModelFacts) -> None:
        """Refuse, before any forward, a probe the model cannot take (every rank decides alike)."""
        if model in self._validated:
            return
        fed = passes(self.metric_names, self.probe, self.num_views)  # only what the selected metrics feed
        facts.check_probe(self.probe, longest=max(int(mask.sum(dim=1).max()) for _, _, mask in fed))
        check_probe_cost(  # warns, before the first forward, about a probe far costlier than its forward passes
            model, layers=len(facts.blocks(self.layers)) + 1, lengths=self.probe.attention_mask.sum(1).tolist(),
            metric_names=self.metric_names, views=self.num_views, alpha=self.alpha, batch_size=self.batch_size,
        )
        self._validated.add(model)

    def _probe(self, model: nn.Module, step: int, started: float) -> ProbeRecord:
        facts = model_facts(model)
        blocks = facts.blocks(self.layers)
        self._validate(model, facts)
        collector = Collector(self.metric_names, self.probe, layers=len(blocks) + 1, views=self.num_views, alpha=self.alpha)
        local_error = self._forward(model, facts, blocks, collector)
        collector.reduce_across_ranks(local_error)
        inputs = collector.set_inputs(self.seed)
        inputs.labels, inputs.probe_seed = self.probe.labels, self.probe.seed
        if self.references is not None:
            inputs.reference = self.references.for_probe(inputs.pooled)
        metrics, per_prompt = set_level_metrics(self.metric_names, inputs)
        scalars = {name: float(inputs.computed[name]) for name in self.metric_names if registry.REGISTRY[name].scalar}
        notes = []
        if self.references is not None:
            self.references.update(inputs.pooled, step)
            notes = self.references.take_reasons()
        record = self._record(step, started, len(blocks) + 1, metrics, per_prompt)
        record.scalars, record.alerts = scalars, notes + record.alerts
        return record

    def _forward(
        self, model: nn.Module, facts: ModelFacts, blocks: Sequence[nn.Module], collector: Collector
    ) -> BaseException | None:
        """Every micro-batch through ``model``, the hooks feeding ``collector``; the first error, if any."""
        device = self.device or model_device(model)
        options, pass_mask = facts.forward_options, facts.accepts_attention_mask
        local_error: BaseException | None = None
        with isolated(model), LayerHooks(blocks, collector.on_layer) as hooks:
            for inputs in collector.micro_batches(self.batch_size, device, options, pass_mask):
                try:
                    model(**inputs)
                    hooks.check_and_reset()
                except Exception as error:  # keep forwarding: peers' collectives must stay paired
                    hooks.fired = [0] * len(hooks.fired)
                    local_error = local_error or error
        return local_error

    def _record(
        self, step: int, started: float, num_layers: int, metrics: dict[str, list[float]], per_prompt: dict[str, Any]
    ) -> ProbeRecord:
        layers = list(range(num_layers))
        alerts = self.alerts.check(step, layers, metrics)
        record = ProbeRecord(
            step=int(step),
            time=time.time(),
            wall_time_s=time.perf_counter() - started,
            layers=layers,
            metrics=metrics,
            per_prompt=per_prompt,
            alerts=alerts,
            settings=_settings(self, distributed()[1]),
        )
        return record

    # ----------------------------------------------------------------------------------------- lifecycle
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (for ``accelerator.register_for_checkpointing``)."""
        return {"schedule": self.schedule.state_dict(), "error_count": self.error_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.error_count = int(state.get("error_count", self.error_count))

    def close(self) -> None:
        """Flush and close every writer. Safe to call twice."""
        self._writers.close()

    def __enter__(self) -> "LayerWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for interactive use
        try:
            self.close()
        except Exception:
            pass

