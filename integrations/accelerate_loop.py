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

- **Counts optimizer steps**, not micro-batches: a call counts only when ``accelerator.sync_gradients`` is True.
  Or pass your own counter, ``watch.step(step=completed_steps)``; repeated calls with one value are ignored.
- **Logs** each probe's flat scalars (``layerwatch/<metric>/layer_<NN>``) through ``accelerator.log`` to the
  trackers of ``init_trackers``, and writes layerwatch's own run to ``logdir`` (default ``<accelerator.logging_dir
  or project_dir or "runs">/layerwatch``, a folder of its own): ``layerwatch.jsonl`` (``layerwatch.read_run``)
  and its TensorBoard run (all layers per chart, histograms, heatmaps, alerts; ``tensorboard=False`` leaves it
  out). A fresh run moves a finished run found in ``logdir`` aside, so lines never mix with an earlier run's;
  Accelerate's TensorBoard tracker appends to its own folder, so give each run its own ``project_dir`` there.
- **Calls the right object** per backend (:func:`resolve_probe_module`).
- **Resumes**: it registers with ``accelerator.register_for_checkpointing`` (step counter and schedule), so
  ``accelerator.load_state(dir)`` continues the schedule and records newer than the restored step are dropped.
  Create the watch *before* ``load_state``; pass ``register_for_checkpointing=False`` to resume checkpoints
  written without layerwatch.

``probe_at_start=True`` with ``watch.step(step=0)`` (or ``watch.run(step=0)``) probes the initial weights;
``watch.finish()`` also probes the last step when it was not on the schedule. Only data parallelism is supported
(tensor, context or sequence parallelism is refused). The policy is :mod:`layerwatch.monitor.session`'s.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from layerwatch._compat import fsdp2_module_type, is_fsdp2, unwrap_model
from layerwatch.monitor import session
from layerwatch.monitor.model_facts import model_facts

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from layerwatch.monitor import LayerWatch, ProbeRecord

__all__ = ["LayerWatchAccelerate", "resolve_probe_module", "default_logdir"]

_STATE_VERSION = 1


def _strip_compile(module: torch.nn.Module) -> torch.nn.Module:
    """Return the module under a whole-model ``torch.compile`` wrapper (the monitor runs eagerly anyway)."""
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def resolve_probe_module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The object a probe must call for a model returned by ``accelerator.prepare``: the unwrapped module under
    data parallelism (not the DDP wrapper: it would broadcast buffers and flip ``require_forward_param_sync``), the
    ``FullyShardedDataParallel`` root under FSDP1 (the inner module sees flat shards), the model under FSDP2, the
    engine under DeepSpeed (its forward adds DeepSpeed's autocast; every rank calls it).

    Raises:
        ValueError: tensor/context/sequence parallelism, not what ``prepare`` returned under FSDP, or a backend
            that is not data parallel (XLA, Megatron-LM).
    """
    from accelerate.utils import DistributedType

    config = getattr(accelerator, "parallelism_config", None)
    if any(getattr(config, flag, False) for flag in ("tp_enabled", "cp_enabled", "sp_enabled")):
        raise ValueError("layerwatch supports data parallelism only (DDP, FSDP, DeepSpeed ZeRO); this Accelerator's "
                         "parallelism_config enables tensor, context or sequence parallelism (ranks split sequences)")
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        inner = _strip_compile(model)
        if is_fsdp2(accelerator):
            if not isinstance(inner, fsdp2_module_type()):
                raise ValueError(f"FSDP2: pass the fully_shard-ed model prepare returned, not {type(model).__name__}")
            return inner
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(inner, FullyShardedDataParallel):
            raise ValueError(f"FSDP: pass the model accelerator.prepare returned (the FullyShardedDataParallel "
                             f"root), not {type(model).__name__}: an unwrapped module sees flat parameter shards")
        return inner
    if kind == DistributedType.DEEPSPEED:
        return model
    if kind in (DistributedType.XLA, DistributedType.MEGATRON_LM):
        raise ValueError(f"layerwatch does not support the {kind} backend of Accelerate.")
    return _strip_compile(unwrap_model(accelerator, model))  # accelerate < 1.3 keeps compile wrappers


def default_logdir(accelerator: Accelerator) -> str:
    """``<logging_dir or project_dir or "runs">/layerwatch``: a stable folder, so resumed runs append to it."""
    return session.default_logdir(accelerator.logging_dir or accelerator.project_dir)


class LayerWatchAccelerate:
    """Probe a model every ``every`` optimizer steps of an Accelerate loop; see the module docstring.

    Args:
        accelerator: the ``Accelerator`` of the loop.
        model: the model **as returned by** ``accelerator.prepare``.
        probe: a :class:`layerwatch.Probe` or a saved probe's path (the same on every process).
        every: probe every this many optimizer steps (the monitor's schedule; see ``layerwatch.LayerWatch``).
        logdir: layerwatch's own run directory; default :func:`default_logdir`.
        tensorboard: write layerwatch's own TensorBoard run in ``logdir``, with or without trackers (``False``: not).
        log_to_trackers: forward the flat scalars to ``accelerator.log`` when trackers are configured.
        register_for_checkpointing: call ``accelerator.register_for_checkpointing(self)`` so that
            ``save_state``/``load_state`` keep the step counter and schedule.
        **watch_kwargs: passed to ``layerwatch.LayerWatch`` (``metrics``, ``layers``, ``batch_size``, ``alpha``,
            ``strict``, ``probe_at_start``, ``log_spaced_start``, ``max_overhead``, ``writers``, ...).

    The ``LayerWatch`` is created at the first :meth:`step`/:meth:`run` (or :attr:`monitor` access), after
    ``init_trackers`` and ``load_state`` have run, so that the trackers and the resume point are known.
    """

    def __init__(
        self, accelerator: Accelerator, model: torch.nn.Module, probe: Any, *, every: int = 100,
        logdir: str | os.PathLike | None = None, tensorboard: bool | None = True, log_to_trackers: bool = True,
        register_for_checkpointing: bool = True, **watch_kwargs: Any,
    ) -> None:
        self._explicit_resume_step = watch_kwargs.pop("resume_step", None)
        self._watch_kwargs = session.check_watch_options(watch_kwargs, owner="LayerWatchAccelerate")
        session.check_watch_options({"every": every}, owner="LayerWatchAccelerate")
        self.accelerator, self.model, self.every = accelerator, model, every
        self.module = resolve_probe_module(accelerator, model)
        self.probe = session.as_probe(probe)
        session.check_model(self.module, self.probe, self._watch_kwargs.get("layers"), model_facts(self.module))
        self.logdir = os.fspath(logdir) if logdir is not None else default_logdir(accelerator)
        self.tensorboard = tensorboard is None or bool(tensorboard)  # None: the default of older versions
        self.log_to_trackers = log_to_trackers
        self._watch: LayerWatch | None = None
        self._optimizer_step, self._last_seen_step = 0, None
        self._resumed_step: int | None = None
        self._pending_watch_state: dict | None = None
        self._closed = False
        if register_for_checkpointing:
            accelerator.register_for_checkpointing(self)

    @property
    def monitor(self) -> LayerWatch:
        """The underlying :class:`layerwatch.LayerWatch` (created on first use)."""
        return self._get_monitor(first_step=None)

    def _get_monitor(self, first_step: int | None) -> LayerWatch:
        if self._watch is None:
            if self._closed:
                raise RuntimeError("this LayerWatchAccelerate was closed")
            # The resume point: an explicit resume_step=, else the step load_state restored, else the first step.
            step = self._explicit_resume_step if self._explicit_resume_step is not None else self._resumed_step
            trackers = [session.ScalarsWriter(self._log)] if self._uses_trackers() else []
            options = dict(self._watch_kwargs, tensorboard=self.tensorboard)
            options["writers"] = [*(options.get("writers") or []), *trackers]
            self._watch = session.open_watch(
                self.probe, logdir=self.logdir, every=self.every, resume_step=session.resume_point(step, first_step),
                announce_on=self.accelerator.is_main_process, unit="optimizer steps",
                also=" and the accelerator's trackers" if trackers else "", **options,
            )
            if self._pending_watch_state is not None:
                self._watch.load_state_dict(self._pending_watch_state)
                self._pending_watch_state = None
        return self._watch

    def _log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)  # flat keys: TensorBoard makes no sub-run per key

    def _uses_trackers(self) -> bool:
        return bool(self.log_to_trackers and getattr(self.accelerator, "trackers", None))

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
        self._last_seen_step = self._optimizer_step = current
        return self._get_monitor(current).step(self.module, current)

    def run(self, step: int | None = None) -> ProbeRecord | None:
        """Probe now (on every process), e.g. a final probe after the loop. ``step`` defaults to the counter."""
        current = self._optimizer_step if step is None else int(step)
        return self._get_monitor(current).run(self.module, current)

    def finish(self) -> ProbeRecord | None:
        """After the loop, on every process: probe the last optimizer step unless it was probed, then :meth:`close`.
        Returns the final record, or None when the last step was already probed (or nothing was counted)."""
        try:
            return self.run() if session.final_probe_due(self.last_probed_step, self._optimizer_step) else None
        finally:
            self.close()

    def close(self) -> None:
        """Flush and close layerwatch's own writers (the accelerator's trackers are left open)."""
        if self._watch is not None:
            self._watch.close()
        self._closed = True

    def __enter__(self) -> LayerWatchAccelerate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer-step counter and the monitor's schedule state (for ``register_for_checkpointing``)."""
        watch_state = self._watch.state_dict() if self._watch is not None else self._pending_watch_state
        return {"version": _STATE_VERSION, "optimizer_step": self._optimizer_step,
                "last_seen_step": self._last_seen_step, "watch": watch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next probe records drop anything newer than the step."""
        if not isinstance(state, dict) or "optimizer_step" not in state:
            raise ValueError("not a LayerWatchAccelerate state_dict (missing 'optimizer_step')")
        self._optimizer_step = self._resumed_step = int(state["optimizer_step"])
        last = state.get("last_seen_step")
        self._last_seen_step = None if last is None else int(last)
        if self._watch is None:
            self._pending_watch_state = state.get("watch")
            return
        if state.get("watch") is not None:
            self._watch.load_state_dict(state["watch"])
        session.logger.warning(
            "layerwatch: state loaded after the first probe call; records newer than step %d already written are "
            "kept. Call accelerator.load_state before the training loop.", self._optimizer_step,
        )
