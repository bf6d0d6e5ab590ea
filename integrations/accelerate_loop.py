"""layerwatch for Hugging Face Accelerate training loops: one call per loop iteration.

Create a :class:`LayerWatchAccelerate` after ``accelerator.prepare(...)`` and call ``watch.step()`` once per loop
iteration **on every process** (never inside ``if accelerator.is_main_process``: under FSDP and ZeRO-3 the probe
forward is a collective)::

    from accelerate import Accelerator
    from layerwatch import Probe
    from layerwatch.integrations.accelerate_loop import LayerWatchAccelerate

    accelerator = Accelerator(gradient_accumulation_steps=2, log_with="tensorboard", project_dir="runs/exp1")
    accelerator.init_trackers("exp1")                      # optional: W&B, MLflow, TensorBoard, ...
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    probe = Probe.from_texts(eval_texts, tokenizer)         # built once, before training
    watch = LayerWatchAccelerate(accelerator, model, probe, every=100)

    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        watch.step()                                        # counts optimizer steps, probes on schedule
    watch.close()
    accelerator.end_training()

What it does:

- **Counts optimizer steps**, not micro-batches: a call increments the counter only when
  ``accelerator.sync_gradients`` is True (the micro-batch on which the optimizer really steps). To use your own
  counter instead, pass it: ``watch.step(step=completed_steps)``; repeated calls with the same value are ignored,
  so calling it on every micro-batch is safe. In the implicit mode call it exactly once per loop iteration.
- **Logs** every probe's flat scalars (``layerwatch/<metric>/layer_<NN>``, see ``ProbeRecord.flat_scalars``)
  through ``accelerator.log`` to the trackers you configured with ``init_trackers``. When no tracker is configured
  it falls back to its own TensorBoard writer in ``logdir``. In both cases the main process also writes
  ``<logdir>/layerwatch.jsonl`` (read it back with ``layerwatch.read_run(logdir)``). ``logdir`` defaults to
  ``<accelerator.logging_dir or accelerator.project_dir or "runs">/layerwatch``. Trackers receive the per-layer
  scalars only; pass ``tensorboard=True`` to also get layerwatch's own TensorBoard run in ``logdir`` (a chart per
  metric with all layers, per-prompt histograms, layer x step heatmaps, alerts as text).
- **Calls the right object** per backend (see :func:`resolve_probe_module`): the unwrapped module under
  DDP/MULTI_CPU/single process (so no DDP buffer broadcast and no flipped ``require_forward_param_sync``), the FSDP
  root under FSDP1 (its pre-forward all-gathers the flat parameters), the model itself under FSDP2 (the monitor
  ``reshard()``s it afterwards), the engine under DeepSpeed.
- **Resumes**: the watch registers itself with ``accelerator.register_for_checkpointing`` (its ``state_dict``
  holds the optimizer-step counter and the probe schedule), so ``accelerator.load_state(dir)`` continues the
  schedule, and probe records newer than the restored step are dropped from the JSONL / hidden in TensorBoard.
  Pass ``register_for_checkpointing=False`` when you resume from checkpoints written before you added layerwatch
  (``load_state`` refuses a checkpoint whose number of registered objects differs).

More calls, all on every process: ``watch.step(step=0)`` before the loop with ``probe_at_start=True`` (or
``watch.run(step=0)``) probes the initial weights; ``watch.finish()`` instead of ``watch.close()`` after the loop
also probes the final weights when the last step was not on the schedule. To resume, create the watch *before*
``accelerator.load_state(...)`` (Accelerate restores registered objects in registration order)::

    watch = LayerWatchAccelerate(accelerator, model, probe, every=100)
    accelerator.load_state("runs/exp1/checkpoints/checkpoint_3")   # watch.optimizer_step is the saved step again

Only data parallelism (DDP, FSDP1, FSDP2, DeepSpeed ZeRO) is supported; tensor, context or sequence parallelism
is refused at construction, and so are a model whose blocks are not found or that cannot take the probe.

The policy (probe forms, default logdir, resume point, final probe, option checks) is :mod:`layerwatch.monitor.session`'s,
shared with the Trainer callback; this module translates the loop's calls and Accelerate's checkpointing.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from layerwatch.monitor import session
from layerwatch._compat import fsdp2_module_type, is_fsdp2, unwrap_model
from layerwatch.rundir.writers import Writer

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from layerwatch.monitor import LayerWatch, ProbeRecord

__all__ = ["LayerWatchAccelerate", "AcceleratorTrackersWriter", "resolve_probe_module", "default_logdir"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


def _strip_compile(module: torch.nn.Module) -> torch.nn.Module:
    """Return the module under a whole-model ``torch.compile`` wrapper (the monitor runs eagerly anyway)."""
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def resolve_probe_module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The object a layerwatch probe must call for a model returned by ``accelerator.prepare``.

    - ``NO`` / ``MULTI_CPU`` / ``MULTI_GPU`` / other data-parallel types: ``accelerator.unwrap_model(model,
      keep_torch_compile=False)``, the inner module (its ``forward`` keeps Accelerate's autocast wrapper). Calling
      the DDP wrapper instead would broadcast buffers from rank 0 and flip ``require_forward_param_sync``.
    - ``FSDP`` (v1): the ``FullyShardedDataParallel`` root. The unwrapped inner module would see flat parameter
      shards (``'weight' must be 2-D``).
    - ``FSDP`` (v2, ``fully_shard``): the model itself.
    - ``DEEPSPEED``: the engine (its ``forward`` adds DeepSpeed's autocast); every rank must call it.

    Raises:
        ValueError: tensor/context/sequence parallelism is configured, the model is not what ``prepare``
            returned for the FSDP backend, or the backend is not data parallel (XLA, Megatron-LM).
    """
    from accelerate.utils import DistributedType

    config = getattr(accelerator, "parallelism_config", None)
    if config is not None and any(
        getattr(config, flag, False) for flag in ("tp_enabled", "cp_enabled", "sp_enabled")
    ):
        raise ValueError(
            "layerwatch supports data parallelism only (DDP, FSDP, DeepSpeed ZeRO); this Accelerator has tensor, "
            "context or sequence parallelism enabled in its parallelism_config, where ranks share or split "
            "sequences and per-rank probe shards would be wrong."
        )
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        inner = _strip_compile(model)
        if is_fsdp2(accelerator):
            if not isinstance(inner, fsdp2_module_type()):
                raise ValueError(
                    "FSDP2: pass the model returned by accelerator.prepare (a fully_shard-ed module), not "
                    f"{type(model).__name__}."
                )
            return inner
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(inner, FullyShardedDataParallel):
            raise ValueError(
                "FSDP: pass the model returned by accelerator.prepare (the FullyShardedDataParallel root), not "
                f"{type(model).__name__}; an unwrapped module would see sharded flat parameters."
            )
        return inner
    if kind == DistributedType.DEEPSPEED:
        return model
    if kind in (DistributedType.XLA, DistributedType.MEGATRON_LM):
        raise ValueError(f"layerwatch does not support the {kind} backend of Accelerate.")
    return _strip_compile(unwrap_model(accelerator, model))  # accelerate < 1.3 keeps compile wrappers


def default_logdir(accelerator: Accelerator) -> str:
    """``<logging_dir or project_dir or "runs">/layerwatch``: a stable folder, so resumed runs append to it."""
    return session.default_logdir(accelerator.logging_dir or accelerator.project_dir)


class AcceleratorTrackersWriter(Writer):
    """A layerwatch writer that forwards each record's flat scalars to ``accelerator.log`` (main process only).

    Flat keys (``layerwatch/<metric>/layer_<NN>``) keep TensorBoard from making one sub-run per key, which it
    does for nested dicts. Non-finite values are logged as they are (trackers accept NaN).
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def write(self, record: ProbeRecord) -> None:
        values = {key: float(value) for key, value in record.flat_scalars().items()}
        if values:
            self.accelerator.log(values, step=int(record.step))

    def close(self) -> None:
        """Nothing to close: the trackers belong to the accelerator (``accelerator.end_training()``)."""


class LayerWatchAccelerate:
    """Probe a model every ``every`` optimizer steps of an Accelerate loop; see the module docstring.

    Args:
        accelerator: the ``Accelerator`` of the loop.
        model: the model **as returned by** ``accelerator.prepare``.
        probe: a :class:`layerwatch.Probe` (build it once before training, on every process, identically).
        every: probe every this many optimizer steps (the monitor's schedule; see ``layerwatch.LayerWatch``).
        logdir: where the JSONL (and the fallback TensorBoard events) go; default :func:`default_logdir`.
        tensorboard: ``None`` (default): use layerwatch's own TensorBoard writer only when the accelerator has no
            trackers; ``True``: always (in addition to the trackers); ``False``: never.
        log_to_trackers: forward the flat scalars to ``accelerator.log`` when trackers are configured.
        register_for_checkpointing: call ``accelerator.register_for_checkpointing(self)`` so that
            ``save_state``/``load_state`` keep the step counter and schedule.
        **watch_kwargs: passed to ``layerwatch.LayerWatch`` (``metrics``, ``layers``, ``batch_size``, ``alpha``,
            ``strict``, ``probe_at_start``, ``log_spaced_start``, ``max_overhead``, ``writers``, ...).

    The underlying ``LayerWatch`` is created at the first :meth:`step`/:meth:`run` (or :attr:`monitor` access), i.e.
    after ``init_trackers`` and ``load_state`` have run, so that the logging route and the resume point are known.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        probe: Any,
        *,
        every: int = 100,
        logdir: str | os.PathLike | None = None,
        tensorboard: bool | None = None,
        log_to_trackers: bool = True,
        register_for_checkpointing: bool = True,
        **watch_kwargs: Any,
    ) -> None:
        session.check_watch_options(dict(watch_kwargs, every=every), owner="LayerWatchAccelerate")
        probe = session.as_probe(probe)
        self.accelerator = accelerator
        self.model = model
        self.module = resolve_probe_module(accelerator, model)
        session.check_model(self.module, probe, watch_kwargs.get("layers"))
        self.probe = probe
        self.every = every
        self.logdir = os.fspath(logdir) if logdir is not None else default_logdir(accelerator)
        self.tensorboard = tensorboard
        self.log_to_trackers = log_to_trackers
        self._watch_kwargs = dict(watch_kwargs)
        self._explicit_resume_step = self._watch_kwargs.pop("resume_step", None)
        self._watch: LayerWatch | None = None
        self._optimizer_step = 0
        self._last_seen_step: int | None = None
        self._resumed_step: int | None = None
        self._pending_watch_state: dict | None = None
        self._closed = False
        if register_for_checkpointing:
            accelerator.register_for_checkpointing(self)

    # ------------------------------------------------------------------ the monitor
    @property
    def monitor(self) -> LayerWatch:
        """The underlying :class:`layerwatch.LayerWatch` (created on first use)."""
        return self._get_monitor(first_step=None)

    def _get_monitor(self, first_step: int | None) -> LayerWatch:
        if self._watch is None:
            self._watch = self._build_watch(self._resume_point(first_step))
        return self._watch

    def _resume_point(self, first_step: int | None) -> int:
        """The monitor's ``resume_step``: from an explicit ``resume_step=``, else the step ``load_state`` restored,
        else the first step (:func:`layerwatch.monitor.session.resume_point`)."""
        restored = self._explicit_resume_step if self._explicit_resume_step is not None else self._resumed_step
        return session.resume_point(restored, first_step)

    def _uses_trackers(self) -> bool:
        return bool(self.log_to_trackers and getattr(self.accelerator, "trackers", None))

    def _build_watch(self, resume_step: int) -> LayerWatch:
        from layerwatch.monitor import LayerWatch

        if self._closed:
            raise RuntimeError("this LayerWatchAccelerate was closed")
        use_trackers = self._uses_trackers()
        tensorboard = (not use_trackers) if self.tensorboard is None else bool(self.tensorboard)
        writers = list(self._watch_kwargs.pop("writers", None) or [])
        if use_trackers:
            writers.append(AcceleratorTrackersWriter(self.accelerator))
        if self.accelerator.is_main_process:
            logger.info(
                "layerwatch: probing %s every %d optimizer steps; logging to %s%s",
                type(self.module).__name__,
                self.every,
                self.logdir,
                " and the accelerator's trackers" if use_trackers else "",
            )
        watch = LayerWatch(
            self.probe,
            logdir=self.logdir,
            every=self.every,
            tensorboard=tensorboard,
            writers=writers,
            resume_step=resume_step,
            **self._watch_kwargs,
        )
        if self._pending_watch_state is not None:
            watch.load_state_dict(self._pending_watch_state)
            self._pending_watch_state = None
        return watch

    # ------------------------------------------------------------------ the loop API
    @property
    def optimizer_step(self) -> int:
        """Optimizer steps counted so far (or the last explicit ``step=`` value)."""
        return self._optimizer_step

    @property
    def last_probed_step(self) -> int | None:
        """The last step that was probed (or skipped after a failed probe), or None."""
        last = None if self._watch is None else self._watch.last_probed_step
        return None if last is None or last < 0 else int(last)

    def step(self, step: int | None = None) -> ProbeRecord | None:
        """Call once per loop iteration on every process; probes when the schedule says so.

        Args:
            step: your own optimizer-step counter. When omitted, the watch counts iterations on which
                ``accelerator.sync_gradients`` is True (call it exactly once per iteration then).

        Returns:
            The probe's record (on every process) or None when nothing was probed or the probe failed.
        """
        if step is None:
            if not self.accelerator.sync_gradients:
                return None
            current = self._optimizer_step + 1
        else:
            current = int(step)
            if current < 0:
                raise ValueError(f"step must be >= 0, got {step!r}")
        if self._last_seen_step is not None and current == self._last_seen_step:
            return None  # a repeated call for the same optimizer step (e.g. on every micro-batch)
        self._last_seen_step = current
        self._optimizer_step = current
        return self._get_monitor(current).step(self.module, current)

    def run(self, step: int | None = None) -> ProbeRecord | None:
        """Probe now (on every process), e.g. a final probe after the loop. ``step`` defaults to the counter."""
        current = self._optimizer_step if step is None else int(step)
        return self._get_monitor(current).run(self.module, current)

    def finish(self) -> ProbeRecord | None:
        """After the loop, on every process: probe the last optimizer step unless it was probed, then :meth:`close`.

        Returns the final record, or None when the last step was already probed (or nothing was counted).
        """
        record = None
        try:
            if session.final_probe_due(self.last_probed_step, self._optimizer_step):
                record = self.run()
        finally:
            self.close()
        return record

    def close(self) -> None:
        """Flush and close layerwatch's own writers (the accelerator's trackers are left open)."""
        if self._watch is not None:
            self._watch.close()
        self._closed = True

    def __enter__(self) -> LayerWatchAccelerate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The optimizer-step counter and the monitor's schedule state (for ``register_for_checkpointing``)."""
        if self._watch is not None:
            watch_state = self._watch.state_dict()
        else:
            watch_state = self._pending_watch_state
        return {
            "version": _STATE_VERSION,
            "optimizer_step": self._optimizer_step,
            "last_seen_step": self._last_seen_step,
            "watch": watch_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next probe records drop anything newer than the step."""
        if not isinstance(state, dict) or "optimizer_step" not in state:
            raise ValueError("not a LayerWatchAccelerate state_dict (missing 'optimizer_step')")
        self._optimizer_step = int(state["optimizer_step"])
        last = state.get("last_seen_step")
        self._last_seen_step = None if last is None else int(last)
        self._resumed_step = self._optimizer_step
        watch_state = state.get("watch")
        if self._watch is not None:
            if watch_state is not None:
                self._watch.load_state_dict(watch_state)
            logger.warning(
                "layerwatch: state loaded after the first probe call; records newer than step %d already written "
                "are kept. Call accelerator.load_state before the training loop.",
                self._optimizer_step,
            )
        else:
            self._pending_watch_state = watch_state
