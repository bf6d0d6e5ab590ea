"""Hugging Face ``Trainer`` integration: one callback, no other change to the training script.

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                      processing_class=tokenizer, callbacks=[LayerWatchCallback(every=200)])
    trainer.train()          # then: tensorboard --logdir <output_dir>/layerwatch

What the callback does, event by event:

- ``on_train_begin`` (every rank): gets a probe (see *Where the probe comes from*), checks that the model can take
  it, and creates the :class:`layerwatch.LayerWatch` monitor (world process zero writes ``probe.safetensors`` and the
  records). The logdir defaults to ``<output_dir>/layerwatch``, a stable folder, so a run resumed from a checkpoint
  continues the same series: when ``state.global_step > 0`` the monitor is told ``resume_step=global_step``, which
  drops the JSONL records the interrupted run wrote after that checkpoint and makes TensorBoard hide its later events
  (``purge_step``). A run that starts from step 0 in a folder holding a finished run moves that run to
  ``<logdir>.previous-<time>`` (never deleted; a warning says where); a folder another process is still writing
  is refused.
  On world process zero, when ``args.report_to`` names ``wandb`` or ``mlflow`` and that tracker has an active run
  (the Trainer's own callbacks start it), the scalars go there too, on the global step (:mod:`layerwatch.rundir.trackers`).
- ``on_step_end`` (every rank): when the schedule says so, probes ``kwargs["model"]`` at step ``state.global_step``:
  the object the Trainer's own evaluation calls (the unwrapped model under DDP, the FSDP root, ``engine.module``
  under DeepSpeed), on every rank, because sharded models need every rank in every forward. Only world process zero
  writes. The last step (``global_step == max_steps``) is always probed, before its checkpoint is saved.
- ``on_train_end``: probes once more if training stopped early at a step that was not probed (not when
  ``load_best_model_at_end`` has replaced the weights: they would not be that step's weights), then closes.

Where the probe comes from, in this order:

1. ``probe=``: a :class:`layerwatch.Probe`, the path of a saved probe, a list of texts (tokenized with the Trainer's
   ``processing_class``) or an indexable dataset (``len`` and ``dataset[i]``).
2. When resuming (``global_step > 0``) and ``<logdir>/probe.safetensors`` exists: that file, so the resumed series
   is measured on exactly the same prompts.
3. The evaluation dataset: the dataset of ``eval_dataloader`` if the Trainer already built one, else the Trainer's
   ``eval_dataset`` (the first one of a dict). The callback events do not carry the datasets, so the callback looks
   for the calling ``Trainer`` on the call stack; pass ``probe=eval_dataset`` to make this explicit.
4. The training dataset, read as ``train_dataloader.dataset`` (attribute access only).

Datasets are read by indexing (:meth:`layerwatch.Probe.from_dataset`): their ``input_ids`` when they are tokenized,
else their text column with the tokenizer. The training dataloader is never iterated: iterating it would advance the
sampler and, under Accelerate, broadcast RNG state, changing the training run.

The policy (probe forms, default logdir, resume point, final probe, option checks) lives in
:mod:`layerwatch.monitor.session`, shared with the Accelerate integration; this module translates the Trainer's events, and
:func:`find_dataset` finds the Trainer's datasets, which the events do not carry.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from layerwatch.monitor import session
from layerwatch.checks import check_int
from layerwatch.monitor import all_ranks_max
from layerwatch.metrics.registry import resolve_metrics
from layerwatch.rundir.files import PROBE_FILENAME
from layerwatch.rundir.trackers import tracker_writers

logger = logging.getLogger(__name__)

__all__ = ["LayerWatchCallback"]

DEFAULT_MAX_LENGTH = session.DEFAULT_MAX_LENGTH
_OWNER = "LayerWatchCallback"
_SET_BY_CALLBACK = ("probe", "logdir", "resume_step")


class LayerWatchCallback(TrainerCallback):
    """Probes every layer of the model being trained every ``every`` optimizer steps and logs the metrics.

    Args:
        every: probe every ``every`` optimizer steps (``state.global_step``), plus steps 1, 2, 4, ... early on
            (``log_spaced_start``) and the last step.
        probe: what to probe with (see the module docstring): a :class:`layerwatch.Probe`, a saved probe's path, a
            list of texts, or an indexable dataset. ``None`` builds one from the evaluation (else training) dataset.
        logdir: where the run is written; default ``<output_dir>/layerwatch``.
        metrics: ``"light"``, ``"standard"`` (default) or ``"paper"``, or a list of metric names.
        layers: override the discovery of the decoder blocks: a dotted path (``"model.layers"``) or a list of modules.
        batch_size: probe prompts per forward pass.
        strict: re-raise probe failures instead of logging them and carrying on with training.
        stop_on_collapse: set ``control.should_training_stop`` when a probe raises a collapse alert.
        num_prompts: prompts in a probe built by the callback (ignored when ``probe`` is a :class:`~layerwatch.Probe`
            or a path).
        max_length: longest prompt, in tokens, of a probe built by the callback. Default: 128, or less when the
            model has fewer positions than the longest augmented view would need (views are up to ~30% longer).
        text_column: the text column of a dataset that has no ``input_ids``.
        **watch_options: any other :class:`layerwatch.LayerWatch` option (``alpha``, ``max_overhead``,
            ``probe_at_start``, ``tensorboard``, ``jsonl``, ``writers``, ``collapse_threshold``, ``seed``, ...).

    Raises:
        ValueError: a bad ``every``, ``metrics``, ``batch_size``, ``num_prompts``, ``max_length``, ``alpha`` or
            ``max_overhead`` (checked by :func:`layerwatch.monitor.session.check_watch_options`, with the monitor's checks).
        TypeError: an option :class:`layerwatch.LayerWatch` does not have, or a ``probe`` of an unusable type.

    At ``on_train_begin`` (on every rank alike, before the first step) a ``ValueError`` says so when no probe can be
    built (texts without a tokenizer, an iterable-only dataset, no dataset at all) or the model cannot take it (its
    blocks are not found, a token id past its vocabulary, prompts past its positions). Failures of the probe itself
    during training are logged and counted, and training goes on (``strict=True`` raises instead).
    """

    def __init__(
        self,
        every: int = 100,
        *,
        probe: Any = None,
        logdir: str | os.PathLike | None = None,
        metrics: str | Sequence[str] = "standard",
        layers: str | Sequence[Any] | None = None,
        batch_size: int = 16,
        strict: bool = False,
        stop_on_collapse: bool = False,
        num_prompts: int = 64,
        max_length: int | None = None,
        text_column: str = "text",
        **watch_options: Any,
    ) -> None:
        self.watch_options: dict[str, Any] = dict(
            watch_options, metrics=metrics, layers=layers, batch_size=batch_size, strict=strict
        )
        session.check_watch_options(dict(self.watch_options, every=every), owner=_OWNER, reserved=_SET_BY_CALLBACK)
        check_int(num_prompts, "num_prompts", minimum=1)
        if max_length is not None:
            check_int(max_length, "max_length", minimum=1)
        session.check_probe_source(probe, owner=_OWNER)
        self.every = every
        self.probe = probe
        self.logdir = None if logdir is None else os.fspath(logdir)
        self.stop_on_collapse = bool(stop_on_collapse)
        self.num_prompts = num_prompts
        self.max_length = max_length
        self.text_column = text_column
        self.watch: Any = None  # the layerwatch.LayerWatch of the current train() call
        self._start_step = 0

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        from layerwatch import LayerWatch

        if self.watch is not None:  # a second train() call with the same callback
            self.watch.close()
            self.watch = None
        logdir = Path(self.logdir if self.logdir is not None else session.default_logdir(args.output_dir))
        self._start_step = int(state.global_step)
        is_main = bool(state.is_world_process_zero)
        model = kwargs.get("model")
        probe = session.resolve_probe(
            self.probe, owner=_OWNER, model=model,
            tokenizer=_text_tokenizer(kwargs.get("processing_class") or kwargs.get("tokenizer")),
            saved=logdir / PROBE_FILENAME, resuming=self._start_step > 0, warn_changed=is_main,
            views=resolve_metrics(self.watch_options["metrics"])[2],  # the augmented views the metrics feed
            find_dataset=lambda: find_dataset(kwargs), num_prompts=self.num_prompts, max_length=self.max_length,
            seed=int(self.watch_options.get("seed", 0)), text_column=self.text_column,
        )
        if model is not None:
            session.check_model(model, probe, self.watch_options.get("layers"))
        options = dict(self.watch_options)
        # Resuming keeps the records up to the checkpoint's step; a run from step 0 is a fresh run (resume_step=-1):
        # a finished run in the same folder moves to <logdir>.previous-<time> (layerwatch.rundir.claim), never deleted,
        # and a live writer there refuses it.
        if not is_main:  # guard the output, never the collective: the other ranks probe too but write nothing
            options["writers"] = None
        else:  # follow report_to: W&B / MLflow runs the Trainer started get the scalars too (layerwatch.rundir.trackers)
            options["writers"] = [*(options.get("writers") or []), *tracker_writers(getattr(args, "report_to", None))]
        self.watch = LayerWatch(
            probe,
            logdir=str(logdir) if is_main else None,
            every=self.every,
            resume_step=session.resume_point(self._start_step or None),
            **options,
        )
        logger.info(
            "layerwatch: probing %d prompts every %d steps%s; writing to %s",
            probe.num_prompts, self.every,
            f" (resuming after step {self._start_step})" if self._start_step else "", logdir,
        )
        if self._start_step == 0 and self.watch.should_probe(0):  # probe_at_start=True
            self._probe(model, 0, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.watch is None:
            return
        step = int(state.global_step)
        model = kwargs.get("model")
        # step() on every optimizer step (it also times training, for max_overhead); it probes when scheduled.
        record = self.watch.step(model, step)
        probed = self.watch.last_probed_step == step
        if not probed and state.max_steps and step >= state.max_steps:  # always probe the last step
            record = self.watch.run(model, step)
            probed = True
        if probed:
            self._after_probe(record, step, control)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.watch is None:
            return
        step = int(state.global_step)
        try:
            if session.final_probe_due(self.watch.last_probed_step, step, self._start_step):
                if getattr(args, "load_best_model_at_end", False) and getattr(state, "best_model_checkpoint", None):
                    logger.info(
                        "layerwatch: no final probe at step %d: load_best_model_at_end replaced the weights", step
                    )
                else:
                    self._probe(kwargs.get("model"), step, control)
        finally:
            self.watch.close()
            self.watch = None

    # ------------------------------------------------------------------ helpers

    def _probe(self, model: Any, step: int, control: TrainerControl) -> None:
        self._after_probe(self.watch.run(model, step), step, control)

    def _after_probe(self, record: Any, step: int, control: TrainerControl) -> None:
        """Stop training on a collapse alert when asked (every rank calls this after the same probes)."""
        if not self.stop_on_collapse:
            return
        collapsed = record is not None and any(str(alert).startswith("collapse") for alert in record.alerts)
        if all_ranks_max(float(collapsed)) > 0:  # OR over ranks: a lone stop would leave the others waiting
            logger.warning("layerwatch: representation collapse at step %d; stopping training (stop_on_collapse)", step)
            control.should_training_stop = True


# ---------------------------------------------------------------------- where the Trainer keeps its datasets


def find_dataset(kwargs: Mapping[str, Any]) -> tuple[Any, str]:
    """The dataset to build a probe from, and its description: evaluation first, then training.

    The callback events pass the data loaders (``eval_dataloader`` only once the Trainer evaluated) but not the
    datasets, so the Trainer's ``eval_dataset`` (the first one of a dict) and ``train_dataset`` are read from the
    calling ``Trainer`` on the call stack (:func:`_calling_trainer`). The training loader is only read as
    ``train_dataloader.dataset``, never iterated.
    """
    eval_loader = kwargs.get("eval_dataloader")
    if eval_loader is not None and getattr(eval_loader, "dataset", None) is not None:
        return eval_loader.dataset, "the evaluation dataset"
    trainer = _calling_trainer()
    eval_dataset = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_dataset, Mapping) and eval_dataset:
        name, eval_dataset = next(iter(eval_dataset.items()))
        return eval_dataset, f"the evaluation dataset {name!r}"
    if eval_dataset is not None:
        return eval_dataset, "the evaluation dataset"
    train_loader = kwargs.get("train_dataloader")
    dataset = getattr(train_loader, "dataset", None)  # attribute access only: never iterate the loader
    if dataset is None and trainer is not None:
        dataset = getattr(trainer, "train_dataset", None)
    return dataset, "the training dataset"


def _calling_trainer(max_depth: int = 12) -> Any:
    """The ``transformers.Trainer`` whose callback handler is calling us, found on the call stack (or ``None``)."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def _text_tokenizer(processing_class: Any) -> Any:
    """The text tokenizer of a ``processing_class`` (a tokenizer itself, or a processor's ``.tokenizer``)."""
    if processing_class is None:
        return None
    if callable(processing_class) and hasattr(processing_class, "pad_token_id"):
        return processing_class
    return getattr(processing_class, "tokenizer", None)
