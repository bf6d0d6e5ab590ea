"""The monitor: ``LayerWatch`` decides when to probe and runs one probe, top to bottom.

Path of the data (one probe, :meth:`LayerWatch.run` -> ``_probe``)::

    _validate                     once per model: the probe fits it (else it is cut to fit, with one warning), a
                                  continued run keeps its recorded settings, the cost estimate
    Collector(metrics, probe)     buffers for what the selected metrics need (layerwatch.monitor.collect, from the registry)
    isolated(model)               eval + no_grad, RNG forked, flags restored, eager, FSDP2 resharded
      for each micro-batch of this rank's rows, pass by pass (clean batch, then each augmented view):
        model(**inputs)  ->  hooks deliver layer 0..L one at a time  ->  Collector.on_layer reduces each at once
    Collector.reduce_across_ranks agree on errors, then one packed all-reduce per kind (sum, max)
    set_level_metrics             per-layer values, a pure function of the reduced buffers
    ProbeRecord + alerts          ->  writers, on the main rank, after the probe (a WriterGroup: a failing writer is
                                      dropped and counted, never a failed probe; layerwatch.rundir.claim opens the run
                                      directory's writers)

The options come grouped (:mod:`layerwatch.monitor.options`); the schedule
(:class:`layerwatch.monitor.schedule.ProbeSchedule`) says when; :attr:`LayerWatch.last_outcome` says what the last
:meth:`~LayerWatch.step` or :meth:`~LayerWatch.run` call did.
"""

from __future__ import annotations

import enum
import inspect
import logging
import os
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwatch import metrics as M
from layerwatch.metrics import registry
from layerwatch.monitor.alerts import AlertTracker
from layerwatch.monitor.capture import ForwardInputs, isolated, model_device
from layerwatch.monitor.collect import Collector, ProbeError, all_ranks_max, distributed, forward_all, passes, set_level_metrics
from layerwatch.monitor.distributed import agree_before_forward, fingerprint
from layerwatch.monitor.cost import check_probe_cost
from layerwatch.monitor.model_facts import ModelFacts, model_facts
from layerwatch.monitor.options import (
    DEFAULT_MEMORY_BUDGET,
    GROUPS,
    KEYWORDS,
    LayerWatchOptions,
    check_continuation,
    first_recorded_settings,
    run_settings,
)
from layerwatch.probe import Probe
from layerwatch.monitor.references import References
from layerwatch.rundir.files import JSONL_NAME, PROBE_FILENAME
from layerwatch.rundir.record import ProbeRecord
from layerwatch.metrics.registry import resolve_metrics
from layerwatch.rundir.claim import open_writers
from layerwatch.monitor.schedule import ProbeSchedule, TrainingPace
from layerwatch.rundir.writers import Writer, WriterGroup

logger = logging.getLogger(__name__)

__all__ = [
    "LayerWatch", "ProbeRecord", "ProbeError", "ProbeOutcome", "METRIC_PRESETS", "ALL_METRICS", "resolve_metrics",
    "all_ranks_max", "check_options", "DEFAULT_MEMORY_BUDGET",
]

# Derived aliases of the built-in metrics (the registry, layerwatch.metrics.registry, is the live source).
METRIC_PRESETS: dict[str, tuple[str, ...]] = registry.metric_presets()
ALL_METRICS = registry.all_metrics()


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

    Kept for the integrations; each value is checked by its options group (:mod:`layerwatch.monitor.options`), the
    one place it is checked. :func:`layerwatch.monitor.options.check_keywords` checks every option (and the names).
    """
    given: dict[str, Any] = {"alpha": alpha, "batch_size": batch_size, "collapse_probes": collapse_probes}
    given.update({k: v for k, v in (("every", every), ("max_overhead", max_overhead), ("metrics", metrics)) if v is not None})
    LayerWatchOptions.from_keywords(**given)


def _signature() -> inspect.Signature:
    """``LayerWatch``'s signature as ``help()`` and ``inspect`` show it: every option keyword, with its default."""
    defaults = LayerWatchOptions().flat()
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter("probe", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("logdir", keyword),
        inspect.Parameter("resume_step", keyword, default=None),
        inspect.Parameter("model", keyword, default=None),
        inspect.Parameter("options", keyword, default=None),
        *(inspect.Parameter(name, keyword, default=defaults[name]) for name in KEYWORDS),
        *(inspect.Parameter(name, keyword, default=None) for name in GROUPS),
    ]
    return inspect.Signature(parameters)


class LayerWatch:
    """Probe a model's layers during training and log per-layer representation metrics.

    Args:
        probe: the fixed :class:`layerwatch.Probe` every probe runs.
        logdir: run directory for ``layerwatch.jsonl``, TensorBoard events and ``probe.safetensors`` (``~`` is
            expanded); ``None`` writes nothing to disk (give ``writers=`` instead).
        resume_step: the step a run resumed from: records after it are dropped and TensorBoard purges them. A run
            continued in the same ``logdir`` (a resume, or any run appending to its records) must keep the recorded
            settings that change the values (``alpha``, the layer selection, ...): another value is refused, naming
            the setting (:func:`layerwatch.monitor.options.check_continuation`).
        model: optional: the model, to fit the probe and check it now rather than at the first probe.
        options: all options as one :class:`layerwatch.monitor.options.LayerWatchOptions` (instead of keywords).

    Options, as keywords (or as whole groups: ``schedule=``, ``measurement=``, ``probing=``, ``alerts=``,
    ``outputs=``; see :mod:`layerwatch.monitor.options`, where each is checked):

    - schedule: ``every`` (probe every N optimizer steps, default 100), ``log_spaced_start`` (also steps 1, 2, 4,
      ... below ``every``; default True), ``probe_at_start`` (also step 0), ``max_overhead`` (keep probe time below
      this fraction of training time by stretching the interval; default None).
    - measurement: ``metrics`` (``"light"``, ``"standard"`` (default), ``"paper"`` (LiDAR on 16 views) or a list
      of metric names), ``alpha`` (Rényi order of the matrix entropies, 1 = von Neumann), ``seed`` (DiME's
      permutations), ``memory_budget`` (bytes the set-level metrics may use at their peak, default 2 GiB; ``None``:
      no check; a probe over it is refused here, before any training step, with the estimate and the knobs).
    - probing: ``layers`` (override block discovery: a dotted path such as ``"model.layers"`` or a list of
      modules), ``batch_size`` (prompts per probe forward, default 16), ``device`` (where probe inputs go; default
      the model's first parameter's), ``strict`` (re-raise probe failures instead of logging them and carrying
      on), ``forward_inputs`` (``callable(input_ids, attention_mask)`` giving the forward's arguments, for a model
      that does not take ``input_ids=``), ``block_output`` (``callable(block output) -> [batch, tokens, hidden]``).
    - alerts: ``collapse_threshold`` (the floor of the normalized dataset entropy, default 0.05) and
      ``collapse_probes`` (consecutive probes at or below it before a collapse alert, default 2); layers with an
      attention sink are not judged (see :mod:`layerwatch.monitor.alerts`).
    - outputs: ``tensorboard``, ``jsonl`` (write TensorBoard events / the JSONL file into ``logdir``; default
      True) and ``writers`` (extra writers, objects with ``write(record)`` and ``close()``, written on the main
      process; formerly ``sinks=``, still accepted with a ``DeprecationWarning``).

    A probe whose prompts or augmented views are longer than the model's positions is cut to the longest
    ``max_length`` whose views fit, with one warning naming it, before its first forward.
    """

    def __init__(
        self,
        probe: Any,
        *,
        logdir: str | os.PathLike | None,
        resume_step: int | None = None,
        model: nn.Module | None = None,
        options: LayerWatchOptions | None = None,
        **keywords: Any,
    ) -> None:
        if not isinstance(probe, Probe):
            raise TypeError(
                f"probe must be a layerwatch.Probe, got {type(probe).__name__}; build one with Probe.from_texts, "
                "Probe.from_tensors or Probe.from_dataset"
            )
        if options is not None and keywords:
            raise TypeError(f"give options= or keywords ({', '.join(sorted(keywords))}), not both")
        self.options = options if options is not None else LayerWatchOptions.from_keywords(**keywords)
        self._set_up_metrics(probe)
        self.schedule = ProbeSchedule.from_options(self.options.schedule)
        self.alerts = AlertTracker.from_rules(self.options.alerts)
        self.logdir = Path(logdir).expanduser() if logdir is not None else None
        self.error_count = 0
        self.last_outcome: ProbeOutcome | None = None
        self._resume_step = resume_step
        self._warned_kinds: set[str] = set()
        self._validated: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # by identity, forgotten when freed
        self._pace = TrainingPace()
        self._writers = WriterGroup(strict=self.strict)
        self._probed = 0  # probes that made a record
        self._first_error: BaseException | None = None
        self._block_paths: tuple[str, ...] | None = None
        self.references: References | None = None
        if resume_step is not None:  # the same on every rank, so all ranks keep probing at the same steps
            self.schedule.last_step = resume_step
        self._recorded = self._read_recorded_settings()
        check_continuation(self._recorded, self._settings(), where=str(self.logdir))
        if model is not None:  # fit the probe and check the model before anything is written
            self._validate(model, model_facts(model))
        if self.is_main_process:
            self._open_writers(list(self.options.outputs.writers), resume_step)
        self.references = self._references()

    __signature__ = _signature()

    def _set_up_metrics(self, probe: Probe) -> None:
        measurement = self.options.measurement
        self.preset, self.metric_names, lidar_views = resolve_metrics(measurement.metrics)
        self.metric_names = _labelled_metrics(self.metric_names, probe, explicit=self.preset == "custom")
        check_memory_budget(probe.num_prompts, self.metric_names, measurement.memory_budget)
        if lidar_views and len(probe.views) < lidar_views:
            probe = probe.with_views(lidar_views)
        self.probe = probe
        self.num_views = lidar_views

    def _read_recorded_settings(self) -> dict[str, Any] | None:
        """The settings of the series this run continues (main process; a fresh run, ``resume_step < 0``, none)."""
        if self.logdir is None or not self.is_main_process or (self._resume_step is not None and self._resume_step < 0):
            return None
        return first_recorded_settings(self.logdir / JSONL_NAME, self._resume_step)

    def _references(self) -> References | None:
        if not any(registry.REFERENCE in registry.REGISTRY[name].needs for name in self.metric_names):
            return None
        return References(
            self.probe.series_hash(0), self.logdir, resume_step=self._resume_step, write=self.is_main_process
        )

    # ---------------------------------------------------------------------------------- the options, flat
    alpha = property(lambda self: self.options.measurement.alpha, doc="The Rényi order of the matrix entropies.")
    seed = property(lambda self: self.options.measurement.seed, doc="DiME's permutation seed.")
    layers = property(lambda self: self.options.probing.layers, doc="The ``layers=`` override (None: discovered).")
    batch_size = property(lambda self: self.options.probing.batch_size, doc="Prompts per probe forward.")
    strict = property(lambda self: self.options.probing.strict, doc="Whether probe failures are raised.")
    forward_inputs = property(lambda self: self.options.probing.forward_inputs, doc="The ``forward_inputs=`` adapter.")
    block_output = property(lambda self: self.options.probing.block_output, doc="The ``block_output=`` selector.")

    @property
    def device(self) -> torch.device | None:
        """Where probe inputs go (None: the model's first parameter's device)."""
        device = self.options.probing.device
        return torch.device(device) if device is not None else None

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def is_main_process(self) -> bool:
        return distributed()[0] == 0

    @property
    def last_probed_step(self) -> int | None:
        return self.schedule.last_step

    def _open_writers(self, extra: list[Writer], resume_step: int | None) -> None:
        self._writers.add(*extra)
        if self.logdir is not None:
            outputs = self.options.outputs
            self._writers.add(*open_writers(
                self.logdir, self.probe, tensorboard=outputs.tensorboard, jsonl=outputs.jsonl, resume_step=resume_step
            ))

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

        ``step`` must be the optimizer step count of the whole run, increasing by one per optimizer step (e.g.
        ``trainer.state.global_step``, or a counter you increment after each ``optimizer.step()``), never an epoch
        number or a batch index that restarts each epoch. Calling it again with the same step (once per
        micro-batch under gradient accumulation) is fine: a step is never probed twice. A step before one already
        seen is never probed, and the first such call logs a warning.
        """
        previous = self._pace.observe(step)
        if previous is not None and step < previous:
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
            self._probed += 1
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

    @property
    def sink_error_count(self) -> int:
        """Deprecated name of :attr:`writer_error_count`."""
        warnings.warn("LayerWatch.sink_error_count is deprecated; use writer_error_count", DeprecationWarning, stacklevel=2)
        return self.writer_error_count

    def _report_failure(self, step: int, error: BaseException) -> None:
        self.error_count += 1
        self._first_error = self._first_error or error
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
        """Before any forward, once per model: fit the probe to the model's positions (or refuse it), refuse a
        continued series whose recorded settings this run would change, and warn about a costly probe."""
        if model in self._validated:
            return
        self._fit_probe(facts)
        fed = passes(self.metric_names, self.probe, self.num_views)  # only what the selected metrics feed
        facts.check_probe(self.probe, longest=max(int(mask.sum(dim=1).max()) for _, _, mask in fed))
        paths = facts.block_paths(self.layers)
        check_continuation(self._recorded, self._settings(block_paths=paths), where=str(self.logdir))
        self._block_paths = paths
        check_probe_cost(  # warns, before the first forward, about a probe far costlier than its forward passes
            facts, layers=len(paths) + 1, lengths=self.probe.attention_mask.sum(1).tolist(),
            metric_names=self.metric_names, views=self.num_views, alpha=self.alpha, batch_size=self.batch_size,
            device=(self.device or model_device(model)).type,
        )
        self._validated.add(model)

    def _fit_probe(self, facts: ModelFacts) -> None:
        """Cut a probe longer than the model's positions to the longest prompt whose fed views fit (one warning)."""
        positions = facts.max_positions
        uses_views = any(registry.VIEWS in registry.REGISTRY[name].needs for name in self.metric_names)
        if positions is None:
            return
        fitted = self.probe.fitted_to(positions, uses_views=uses_views)
        if fitted is self.probe:
            return
        longest = self.probe.max_length() if uses_views else int(self.probe.attention_mask.sum(dim=1).max())
        max_length = int(fitted.attention_mask.sum(dim=1).max())
        logger.warning(
            "layerwatch: the probe has prompts%s of %d tokens but the model takes at most %d positions; its prompts "
            "were cut to max_length=%d%s. Build the probe with max_length=%d (e.g. Probe.from_texts(texts, tokenizer, "
            "max_length=%d)) to fit this model and silence this warning",
            " (or augmented views, which insert tokens)" if uses_views else "", longest, positions, max_length,
            ", the longest whose augmented views fit, and its views made again" if uses_views else "",
            max_length, max_length,
        )
        self.probe = fitted
        self._resave_probe()
        if self.references is not None:
            self.references = self._references()

    def _resave_probe(self) -> None:
        if self.logdir is None or not self.is_main_process or not (self.logdir / PROBE_FILENAME).exists():
            return
        try:
            self.probe.save(self.logdir / PROBE_FILENAME)
        except OSError as error:
            logger.warning("layerwatch: could not save the fitted probe to %s (%s)", self.logdir, error)

    def _settings(self, block_paths: Sequence[str] | None = None) -> dict[str, Any]:
        """The settings a record carries: the values this probe uses (:func:`layerwatch.monitor.options.run_settings`)."""
        return run_settings(
            self.options, self.probe, self.metric_names, self.num_views, world=distributed()[1],
            block_paths=block_paths if block_paths is not None else self._block_paths,
        )

    def _probe(self, model: nn.Module, step: int, started: float) -> ProbeRecord:
        blocks, refusal = None, None
        try:  # a rank that refuses must still join the agreement below, or the others would wait alone
            facts = model_facts(model)
            blocks = facts.blocks(self.layers)
            self._validate(model, facts)
            collector = Collector(self.metric_names, self.probe, layers=len(blocks) + 1, views=self.num_views, alpha=self.alpha)
            inputs = ForwardInputs.for_model(
                facts.forward_options, facts.accepts_attention_mask, facts.positional_input, self.forward_inputs
            )
        except Exception as error:
            refusal = error
        sizing = (self.metric_names, self.num_views, self.batch_size)
        agree_before_forward(fingerprint(self.probe, None if blocks is None else len(blocks), sizing), refusal)
        local_error = self._forward(model, blocks, collector, inputs)
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
            notes = self.references.take_reasons(step)
        record = self._record(step, started, len(blocks) + 1, metrics, per_prompt)
        record.scalars, record.alerts = scalars, notes + record.alerts
        record.stderr = inputs.stderr
        return record

    def _forward(
        self, model: nn.Module, blocks: Sequence[nn.Module], collector: Collector, inputs: ForwardInputs
    ) -> BaseException | None:
        """Every micro-batch through ``model``, the hooks feeding ``collector``; the first error, if any."""
        device = self.device or model_device(model)
        with isolated(model):
            return forward_all(
                model, blocks, collector, inputs, batch_size=self.batch_size, device=device, block_output=self.block_output
            )

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
            settings=self._settings(),
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
        """Flush and close every writer (safe to call twice). Warns when every probe of this monitor failed."""
        if self._first_error is not None and self._probed == 0 and self.is_main_process:
            error, self._first_error = self._first_error, None  # said once
            logger.warning(
                "layerwatch: every probe of this run failed (%d probes; the first error: %s: %s), so it wrote no "
                "records%s. Fix that error (strict=True raises it where it happens) and run again",
                self.error_count, type(error).__name__, error,
                f" to {self.logdir}" if self.logdir is not None else "",
            )
        self._writers.close()

    def __enter__(self) -> "LayerWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for interactive use
        try:
            self._writers.close()
        except Exception:
            pass
