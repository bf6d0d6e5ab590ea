"""Hugging Face ``Trainer`` integration: one callback, no other change to the training script.

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                      processing_class=tokenizer, callbacks=[LayerWatchCallback(every=200)])
    trainer.train()          # then: tensorboard --logdir <output_dir>/layerwatch

Event by event (every rank alike: sharded models need every rank in every forward; world process zero writes):

- ``on_train_begin``: gets the probe, checks the model can take it, opens the monitor in ``<output_dir>/layerwatch``
  and logs one line saying where it writes and how to view it (:func:`layerwatch.monitor.session.start_watch`).
  Resuming (``global_step > 0``) keeps the records up to that step and reuses the run's ``probe.safetensors``; a
  run from step 0 moves a finished run in the folder aside. W&B / MLflow runs that ``report_to`` names get the
  scalars too (:mod:`layerwatch.rundir.trackers`).
- ``on_step_end``: probes ``kwargs["model"]`` at ``state.global_step`` when scheduled, and always at ``max_steps``.
- ``on_train_end``: probes an unprobed last step (not when ``load_best_model_at_end`` replaced the weights).

The probe: ``probe=`` (a :class:`layerwatch.Probe`, a saved probe's path, texts tokenized with ``processing_class``,
or an indexable dataset); when resuming, the run's saved probe; else the evaluation dataset (``eval_dataloader``'s,
else the Trainer's ``eval_dataset``), else the training dataset (``train_dataloader.dataset``, never iterated). A
dataset gives its ``input_ids``, else its ``text_column`` through the tokenizer, and its ``label_column`` as classes;
one with fewer usable rows than ``num_prompts`` gives a smaller probe, and the start-up line says so.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from layerwatch.monitor import session
from layerwatch.rundir.trackers import tracker_writers

__all__ = ["LayerWatchCallback", "find_dataset"]


class LayerWatchCallback(TrainerCallback):
    """Probes every layer of the model being trained every ``every`` optimizer steps and logs the metrics.

    Args:
        every: probe every ``every`` optimizer steps (``state.global_step``), plus steps 1, 2, 4, ... early on
            (``log_spaced_start``) and the last step.
        probe: what to probe with (see the module docstring); ``None``: built from the evaluation (else training)
            dataset.
        logdir: where the run is written; default ``<output_dir>/layerwatch``.
        metrics: ``"light"``, ``"standard"`` (default) or ``"paper"``, or a list of metric names.
        layers: override the discovery of the decoder blocks: a dotted path (``"model.layers"``) or a list of modules.
        batch_size: probe prompts per forward pass.
        strict: re-raise probe failures instead of logging them and carrying on with training.
        stop_on_collapse: set ``control.should_training_stop`` when a probe raises a collapse alert.
        num_prompts: prompts in a probe built by the callback (fewer when the dataset has fewer usable rows).
        max_length: longest prompt, in tokens, of a probe built by the callback. Default: 128, or less when the
            model has fewer positions than the longest augmented view would need (views are up to ~30% longer).
        text_column: the text column of a dataset that has no ``input_ids``.
        label_column: the column of each row's class (int or str) in a dataset the probe is built from; enables
            ``probe_accuracy`` and ``best_layer``.
        **watch_options: any other :class:`layerwatch.LayerWatch` option (``alpha``, ``max_overhead``,
            ``probe_at_start``, ``tensorboard``, ``jsonl``, ``writers``, ``collapse_threshold``, ``seed``, ...).

    Raises:
        ValueError, TypeError: a bad option, when the callback is built (:func:`~layerwatch.monitor.session.adapter_options`).

    At ``on_train_begin`` a ``ValueError`` says so when no probe can be built or the model cannot take it. Failures
    of the probe itself during training are logged and counted, and training goes on (``strict=True`` raises).
    """

    def __init__(
        self, every: int = 100, *, probe: Any = None, logdir: str | os.PathLike | None = None,
        metrics: str | Sequence[str] = "standard", layers: str | Sequence[Any] | None = None, batch_size: int = 16,
        strict: bool = False, stop_on_collapse: bool = False, num_prompts: int = 64, max_length: int | None = None,
        text_column: str = "text", label_column: str | None = None, **watch_options: Any,
    ) -> None:
        self.options = session.adapter_options(
            "LayerWatchCallback", every, probe=probe, logdir=logdir, num_prompts=num_prompts, max_length=max_length,
            watch=dict(watch_options, metrics=metrics, layers=layers, batch_size=batch_size, strict=strict),
            text_column=text_column, label_column=label_column, stop_on_collapse=stop_on_collapse,
        )
        self.every = every
        self.watch: Any = None  # the layerwatch.LayerWatch of the current train() call
        self._start_step = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.watch is not None:  # a second train() call with the same callback: close the first (close() is None)
            self.watch = self.watch.close()
        self._start_step = int(state.global_step)
        is_main = bool(state.is_world_process_zero)
        model = kwargs.get("model")
        self.watch = session.start_watch(
            self.options, model=model, base_dir=args.output_dir, start_step=self._start_step, is_main=is_main,
            tokenizer=_text_tokenizer(kwargs.get("processing_class") or kwargs.get("tokenizer")),
            find_dataset=lambda: find_dataset(kwargs),
            trackers=tracker_writers(getattr(args, "report_to", None)) if is_main else (),
        )
        if self._start_step == 0 and self.watch.should_probe(0):  # probe_at_start=True
            self._after_probe(self.watch.run(model, 0), 0, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.watch is None:
            return
        step, model = int(state.global_step), kwargs.get("model")
        record = self.watch.step(model, step)  # on every optimizer step: it also times training (max_overhead)
        probed = self.watch.last_probed_step == step
        if not probed and state.max_steps and step >= state.max_steps:  # always probe the last step
            record, probed = self.watch.run(model, step), True
        if probed:
            self._after_probe(record, step, control)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.watch is None:
            return
        step = int(state.global_step)
        try:
            if session.final_probe_due(self.watch.last_probed_step, step, self._start_step):
                if getattr(args, "load_best_model_at_end", False) and getattr(state, "best_model_checkpoint", None):
                    session.logger.info("layerwatch: no final probe: load_best_model_at_end replaced the weights")
                else:
                    self._after_probe(self.watch.run(kwargs.get("model"), step), step, control)
        finally:
            self.watch.close()
            self.watch = None

    def _after_probe(self, record: Any, step: int, control: TrainerControl) -> None:
        if self.options.stop_on_collapse and session.stop_requested(record, step):
            control.should_training_stop = True


def find_dataset(kwargs: Mapping[str, Any]) -> tuple[Any, str]:
    """The dataset to build a probe from, and its description: evaluation first, then training.

    The events carry the data loaders (``eval_dataloader`` only once the Trainer evaluated) but not the datasets, so
    ``eval_dataset`` and ``train_dataset`` are read from the calling ``Trainer`` on the call stack. The training
    loader is only read as ``train_dataloader.dataset``, never iterated.
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
    dataset = getattr(kwargs.get("train_dataloader"), "dataset", None)  # attribute access only
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
            if isinstance(frame.f_locals.get("self"), Trainer):
                return frame.f_locals["self"]
            frame = frame.f_back
        return None
    finally:
        del frame


def _text_tokenizer(processing_class: Any) -> Any:
    """The text tokenizer of a ``processing_class`` (a tokenizer itself, or a processor's ``.tokenizer``)."""
    if processing_class is None or (callable(processing_class) and hasattr(processing_class, "pad_token_id")):
        return processing_class
    return getattr(processing_class, "tokenizer", None)
