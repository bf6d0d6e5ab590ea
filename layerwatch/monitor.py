"""The monitor: ``LayerWatch`` runs the probe, captures every layer, computes the metrics and writes the record.

Path of the data (one probe)::

    isolated(model)                      eval + no_grad, RNG forked, flags restored, eager, FSDP2 resharded
      for each pass (clean batch, then each augmented view), for each micro-batch of this rank's rows:
        model(**batch)  ->  hooks deliver layer 0..L one at a time  ->  reduced at once to per-prompt values,
                                                                        pooled [B, D] rows and health sums
    agree on errors across ranks, then one all_reduce of the packed buffers
    set-level metrics on the pooled [L+1, M, D] (and views [L+1, M, Q, D])  ->  ProbeRecord  ->  sinks (main rank)
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwatch import metrics as M
from layerwatch._version import __version__
from layerwatch.alerts import AlertTracker
from layerwatch.capture import (
    CaptureError,
    LayerHooks,
    isolated,
    model_device,
)
from layerwatch import registry
from layerwatch.model_facts import ModelFacts, model_facts
from layerwatch.probe import Probe, take_rows
from layerwatch.registry import HEALTH, POOLED, REGISTRY, VIEWS, SetInputs, TokenInputs, resolve_metrics
from layerwatch.record import ProbeRecord
from layerwatch.schedule import ProbeSchedule
from layerwatch.rundir import open_sinks
from layerwatch.sinks import Sink, SinkGroup

logger = logging.getLogger(__name__)

__all__ = ["LayerWatch", "ProbeRecord", "ProbeError", "METRIC_PRESETS", "ALL_METRICS", "resolve_metrics"]

# Derived aliases of the built-in metrics (the registry, layerwatch.registry, is the live source).
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
        heavy = [name for name in ("dime", "infonce", "infonce_chance") if name in metric_names]
        raise ValueError(
            f"a probe of {num_prompts} prompts needs about {estimate / 2**30:.1f} GiB for the M x M matrices of "
            f"{', '.join(heavy)} (and time growing like M^3), over memory_budget={budget / 2**30:.1f} GiB. Use fewer "
            f"prompts (num_prompts= when building the probe), metrics='light' (no M x M matrices), or raise "
            "memory_budget= (None turns the check off)"
        )


class ProbeError(RuntimeError):
    """A probe failed (on this rank or on another one)."""


def _distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_ranks_max(value: float) -> float:
    """The largest ``value`` over all ranks (itself outside torch.distributed). A collective: call it on every rank."""
    rank, world = _distributed()
    if world == 1:
        return value
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([float(value)], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


@dataclass
class _Batch:
    """What the hooks need to know about the micro-batch being forwarded."""

    pass_index: int  # -1 = the clean batch, k >= 0 = augmented view k
    rows: torch.Tensor  # global prompt indices of the real rows
    real: torch.Tensor  # [b] bool: False for rows that only pad this rank's shard
    mask: torch.Tensor  # [b, T] bool


class _Buffers:
    """Per-probe accumulators, filled by the hooks; each rank writes only its own rows so a SUM reduces them."""

    def __init__(self, layers: int, prompts: int, views: int, names: Sequence[str]):
        self.shape = (layers, prompts, views)
        specs = [REGISTRY[name] for name in names]
        token_names = [s.name for s in specs if s.per_prompt is not None] + [u for s in specs for u in s.uses]
        self.token_names = tuple(dict.fromkeys(token_names))  # per-prompt buffers, one per token metric
        self.need_pooled = any(POOLED in s.needs for s in specs)
        self.need_health = any(HEALTH in s.needs for s in specs)
        self.tensors: dict[str, torch.Tensor] = {}
        self.max_abs: torch.Tensor | None = None

    def allocate(self, width: int, device: torch.device) -> None:
        layers, prompts, views = self.shape
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=device)  # noqa: E731
        for name in self.token_names:
            self.tensors[f"per_prompt/{name}"] = zeros(layers, prompts)
        if self.need_health:
            self.tensors["health"] = zeros(layers, 3)  # sum of squares, finite count, non-finite count
            self.max_abs = zeros(layers)
        if self.need_pooled:
            self.tensors["pooled"] = zeros(layers, prompts, width)
        if views:
            self.tensors["views"] = zeros(layers, prompts, views, width)

    def per_prompt(self, name: str) -> torch.Tensor:
        return self.tensors[f"per_prompt/{name}"]

    def set_inputs(self, alpha: float, seed: int) -> SetInputs:
        return SetInputs(
            per_prompt={name: self.per_prompt(name) for name in self.token_names},
            pooled=self.tensors.get("pooled"),
            views=self.tensors.get("views"),
            health=self.tensors.get("health"),
            max_abs=self.max_abs,
            alpha=alpha,
            seed=seed,
        )

    def pack(self) -> torch.Tensor:
        return torch.cat([t.flatten() for t in self.tensors.values()])

    def unpack(self, flat: torch.Tensor) -> None:
        offset = 0
        for name, tensor in self.tensors.items():
            self.tensors[name] = flat[offset : offset + tensor.numel()].view_as(tensor)
            offset += tensor.numel()


class LayerWatch:
    """Probe a model's layers during training and log per-layer representation metrics.

    Args:
        probe: the fixed :class:`layerwatch.Probe` every probe runs.
        logdir: run directory for ``layerwatch.jsonl``, TensorBoard events and ``probe.safetensors``; ``None``
            writes nothing to disk (give ``sinks=`` instead).
        every: probe every N optimizer steps.
        metrics: ``"light"``, ``"standard"`` (default), ``"paper"`` (LiDAR on 16 views) or a list of metric names.
        alpha: Rényi order of the matrix entropies (1 = von Neumann).
        layers: override block discovery: a dotted path (``"model.layers"``) or a list of modules.
        batch_size: prompts per probe forward; bounds the probe's memory.
        log_spaced_start: also probe at steps 1, 2, 4, ... below ``every``.
        probe_at_start: also probe at step 0.
        max_overhead: keep probe time below this fraction of training time by stretching the interval.
        strict: re-raise probe failures instead of logging them and carrying on.
        sinks: extra sinks (objects with ``write(record)`` and ``close()``), written on the main process.
        tensorboard, jsonl: write TensorBoard events / the JSONL file into ``logdir``.
        resume_step: the step a run resumed from: records after it are dropped and TensorBoard purges them.
        device: where probe inputs go; default the device of the model's first parameter.
        collapse_threshold: the floor of the normalized dataset entropy: at or below it (or effective rank at or
            below 1.5) at ``collapse_probes`` consecutive probes, a layer raises a collapse alert; layers with an
            attention sink are not judged (see :mod:`layerwatch.alerts` and the README).
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
        sinks: Sequence[Sink] | None = None,
        tensorboard: bool = True,
        jsonl: bool = True,
        resume_step: int | None = None,
        device: str | torch.device | None = None,
        collapse_threshold: float = 0.05,
        collapse_probes: int = 2,
        seed: int = 0,
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if not isinstance(probe, Probe):
            raise TypeError(
                f"probe must be a layerwatch.Probe, got {type(probe).__name__}; build one with Probe.from_texts, "
                "Probe.from_tensors or Probe.from_dataset"
            )
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be a positive number (1 = von Neumann entropy), got {alpha!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer number of prompts per forward, got {batch_size!r}")
        if isinstance(collapse_probes, bool) or not isinstance(collapse_probes, int) or collapse_probes < 1:
            raise ValueError(f"collapse_probes must be a positive number of consecutive probes, got {collapse_probes!r}")
        self.schedule = ProbeSchedule(
            every=every, log_spaced_start=log_spaced_start, at_start=probe_at_start, max_overhead=max_overhead
        )
        self.preset, self.metric_names, lidar_views = resolve_metrics(metrics)
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
        self._warned_kinds: set[str] = set()
        self._validated: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # by identity, forgotten when freed
        self._last_call: tuple[int, float] | None = None
        self._seconds_per_step: float | None = None
        self._sinks = SinkGroup(strict=strict)
        if resume_step is not None:  # the same on every rank, so all ranks keep probing at the same steps
            self.schedule.last_step = resume_step
        if self.is_main_process:
            self._open_sinks(list(sinks or []), tensorboard, jsonl, resume_step)

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def is_main_process(self) -> bool:
        return _distributed()[0] == 0

    @property
    def last_probed_step(self) -> int | None:
        return self.schedule.last_step

    def _open_sinks(self, extra: list[Sink], tensorboard: bool, jsonl: bool, resume_step: int | None) -> None:
        for sink in extra:
            if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
                raise TypeError(
                    f"sinks= holds {sink!r}, which has no write(record) and close() methods; subclass layerwatch.sinks.Sink"
                )
        self._sinks.add(*extra)
        if self.logdir is not None:
            self._sinks.add(*open_sinks(self.logdir, self.probe, tensorboard=tensorboard, jsonl=jsonl, resume_step=resume_step))

    def add_sink(self, sink: Sink) -> None:
        """Send future records to ``sink`` too (main process only)."""
        if self.is_main_process:
            self._sinks.add(sink)

    # ------------------------------------------------------------------------------------------- schedule
    def should_probe(self, step: int) -> bool:
        """Whether :meth:`step` would probe at ``step`` (never twice for the same step)."""
        return self.schedule.is_due(step)

    def step(self, model: nn.Module, step: int) -> ProbeRecord | None:
        """Call once per optimizer step (on every rank); probes when the schedule says so.

        ``step`` must be the optimizer step count of the whole run, increasing by one per call (e.g.
        ``trainer.state.global_step``, or a counter you increment after each ``optimizer.step()``), never an epoch
        number or a batch index that restarts each epoch. A step at or before one already seen is never probed,
        and the first such call logs a warning.
        """
        now = time.perf_counter()
        if self._last_call is not None and step <= self._last_call[0]:
            self._warn_step_not_increasing(step, self._last_call[0])
        if self._last_call is not None and step > self._last_call[0]:
            per_step = (now - self._last_call[1]) / (step - self._last_call[0])
            self._seconds_per_step = per_step if self._seconds_per_step is None else 0.7 * self._seconds_per_step + 0.3 * per_step
        self._last_call = (step, now)
        if not self.should_probe(step):
            return None
        record = self.run(model, step)
        self._last_call = (step, time.perf_counter())  # probe time is not training time
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
        ``strict=True`` the failure is raised instead.
        """
        started = time.perf_counter()
        record = None
        try:
            record = self._probe(model, step, started)
        except Exception as error:  # the monitor must not kill training
            self._report_failure(step, error)
            if self.strict:
                raise
        finally:
            self.schedule.mark_probed(step)
        if record is not None and self.is_main_process:
            self._sinks.write(record)  # a sink that fails is counted in sink_error_count, not as a failed probe
        self._stretch_schedule(time.perf_counter() - started)
        return record

    @property
    def sink_error_count(self) -> int:
        """How many times a sink failed (a full or read-only disk, ...); each failed sink is closed and dropped."""
        return self._sinks.error_count

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
        self._sinks.write_errors(step, self.error_count)

    def _stretch_schedule(self, probe_seconds: float) -> None:
        if self.schedule.max_overhead is None or self._seconds_per_step is None:
            return
        gap = self.schedule.required_gap(probe_seconds, self._seconds_per_step)
        self.schedule.min_gap = int(all_ranks_max(gap))  # every rank must probe at the same steps

    def _validate(self, model: nn.Module, facts: ModelFacts) -> None:
        """Refuse, before any forward, a probe the model cannot take (every rank decides alike)."""
        if model in self._validated:
            return
        facts.check_probe(self.probe, longest=max(int(mask.sum(dim=1).max()) for _, _, mask in self._passes()))
        self._validated.add(model)

    def _passes(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        needs = {need for name in self.metric_names for need in REGISTRY[name].needs}
        passes = []
        if needs - {VIEWS}:
            passes.append((-1, self.probe.input_ids, self.probe.attention_mask))
        if VIEWS in needs:
            for k in range(self.num_views):
                view_ids, view_mask = self.probe.views[k]
                passes.append((k, view_ids, view_mask))
        return passes

    def _probe(self, model: nn.Module, step: int, started: float) -> ProbeRecord:
        facts = model_facts(model, self.layers)
        self._validate(model, facts)
        blocks = facts.blocks
        rank, world = _distributed()
        device = self.device or model_device(model)
        prompts = self.probe.num_prompts
        uses_views = any(VIEWS in REGISTRY[name].needs for name in self.metric_names)
        buffers = _Buffers(len(blocks) + 1, prompts, self.num_views if uses_views else 0, self.metric_names)
        # This rank's rows, padded so that every rank runs the same number of forwards (collectives stay paired).
        per_rank = math.ceil(prompts / world)
        rows = list(range(rank, prompts, world))
        real = [True] * len(rows) + [False] * (per_rank - len(rows))
        rows += [0] * (per_rank - len(rows))

        current: dict[str, _Batch] = {}

        def on_layer(index: int, hidden: torch.Tensor) -> None:
            batch = current["batch"]
            if not buffers.tensors:
                buffers.allocate(hidden.shape[-1], hidden.device)
            self._reduce_layer(buffers, index, hidden, batch)

        options, pass_mask = facts.forward_options, facts.accepts_attention_mask
        local_error: BaseException | None = None
        with isolated(model), LayerHooks(blocks, on_layer) as hooks:
            for pass_index, all_ids, all_mask in self._passes():
                for start in range(0, per_rank, self.batch_size):
                    chunk = torch.tensor(rows[start : start + self.batch_size])
                    chunk_real = torch.tensor(real[start : start + self.batch_size])
                    ids, mask = take_rows(all_ids, all_mask, chunk)  # right-aligned already: positions start at 0
                    ids, mask = ids.to(device), mask.bool().to(device)
                    current["batch"] = _Batch(pass_index, chunk[chunk_real].to(device), chunk_real.to(device), mask)
                    inputs = {"input_ids": ids, **options}
                    if pass_mask:
                        inputs["attention_mask"] = mask.long()
                    try:
                        model(**inputs)
                        hooks.check_and_reset()
                    except Exception as error:  # keep forwarding: peers' collectives must stay paired
                        hooks.fired = [0] * len(hooks.fired)
                        local_error = local_error or error
        self._agree_and_reduce(buffers, local_error, world)
        return self._record(step, started, len(blocks) + 1, buffers, world)

    def _reduce_layer(self, buffers: _Buffers, index: int, hidden: torch.Tensor, batch: _Batch) -> None:
        """Reduce one layer's [b, T, D] to what the metrics need, right away (the tensor is not kept)."""
        real_hidden, mask = hidden[batch.real], batch.mask[batch.real]
        if real_hidden.shape[0] == 0:
            return
        if batch.pass_index >= 0:
            buffers.tensors["views"][index, batch.rows, batch.pass_index] = M.mean_pool(real_hidden, mask).float()
            return
        layer = TokenInputs(real_hidden, mask, self.alpha)
        for name in buffers.token_names:
            buffers.per_prompt(name)[index, batch.rows] = REGISTRY[name].per_prompt(layer).float()
        if buffers.need_pooled:
            buffers.tensors["pooled"][index, batch.rows] = layer.pooled().float()
        if buffers.need_health:
            tokens = real_hidden[mask].float()
            finite = torch.isfinite(tokens)
            kept = torch.where(finite, tokens, torch.zeros((), device=tokens.device))
            health = buffers.tensors["health"][index]
            health[0] += kept.pow(2).sum()
            health[1] += finite.sum()
            health[2] += (~finite).sum()
            buffers.max_abs[index] = torch.maximum(buffers.max_abs[index], kept.abs().max())

    def _agree_and_reduce(self, buffers: _Buffers, local_error: BaseException | None, world: int) -> None:
        if world > 1 and all_ranks_max(1.0 if local_error is not None else 0.0) > 0 and local_error is None:
            raise ProbeError("the probe failed on another rank; all ranks skip this probe")
        if local_error is not None:
            raise local_error
        if not buffers.tensors:
            raise CaptureError("no layer output was captured")
        if world > 1:
            packed = buffers.pack()
            torch.distributed.all_reduce(packed)
            buffers.unpack(packed)
            if buffers.max_abs is not None:
                torch.distributed.all_reduce(buffers.max_abs, op=torch.distributed.ReduceOp.MAX)

    def _record(self, step: int, started: float, num_layers: int, buffers: _Buffers, world: int) -> ProbeRecord:
        inputs = buffers.set_inputs(self.alpha, self.seed)
        values = {name: REGISTRY[name].set_value(inputs).double() for name in self.metric_names}
        per_prompt = {name: buffers.per_prompt(name).tolist() for name in self.metric_names if REGISTRY[name].histogram}
        if inputs.health is not None:  # a layer with non-finite activations has no trustworthy metric
            broken = inputs.health[:, 2] > 0
            for name, per_layer in values.items():
                if HEALTH not in REGISTRY[name].needs:
                    values[name] = torch.where(broken.to(per_layer.device), torch.nan, per_layer)
        layers = list(range(num_layers))
        metrics = {name: values[name].cpu().tolist() for name in self.metric_names}
        alerts = self.alerts.check(step, layers, metrics)
        record = ProbeRecord(
            step=int(step),
            time=time.time(),
            wall_time_s=time.perf_counter() - started,
            layers=layers,
            metrics=metrics,
            per_prompt=per_prompt,
            alerts=alerts,
            settings=self._settings(world),
        )
        return record

    def _settings(self, world: int) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "metrics": list(self.metric_names),
            "alpha": self.alpha,
            "views": self.num_views,
            "infonce_temperature": 0.1,
            "lidar_delta": 1e-4,
            "dime_permutations": 10,
            "num_prompts": self.probe.num_prompts,
            "batch_size": self.batch_size,
            "world_size": world,
            "probe_hash": self.probe.content_hash,
            "layerwatch_version": __version__,
        }

    # ----------------------------------------------------------------------------------------- lifecycle
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (for ``accelerator.register_for_checkpointing``)."""
        return {"schedule": self.schedule.state_dict(), "error_count": self.error_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.error_count = int(state.get("error_count", self.error_count))

    def close(self) -> None:
        """Flush and close every sink. Safe to call twice."""
        self._sinks.close()

    def __enter__(self) -> "LayerWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for interactive use
        try:
            self.close()
        except Exception:
            pass

