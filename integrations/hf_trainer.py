"""Hugging Face ``Trainer`` integration: one callback, no other change to the training script.

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                      processing_class=tokenizer, callbacks=[LayerWatchCallback(every=200)])
    trainer.train()          # then: tensorboard --logdir <output_dir>/layerwatch

What the callback does, event by event:

- ``on_train_begin`` (every rank): gets a probe (see *Where the probe comes from*), saves it as
  ``<logdir>/probe.safetensors`` (world process zero only) and creates the :class:`layerwatch.LayerWatch` monitor. The
  logdir defaults to ``<output_dir>/layerwatch``, a stable folder, so a run resumed from a checkpoint continues the
  same series: when ``state.global_step > 0`` the monitor is told ``resume_step=global_step``, which drops the JSONL
  records the interrupted run wrote after that checkpoint and makes TensorBoard hide its later events
  (``purge_step``). A run that starts from step 0 in a folder holding a finished run moves that run to
  ``<logdir>.previous-<time>`` (never deleted; a warning says where); a folder another process is still writing
  is refused.
  On world process zero, when ``args.report_to`` names ``wandb`` or ``mlflow`` and that tracker has an active run
  (the Trainer's own callbacks start it), the scalars go there too, on the global step (:mod:`layerwatch.trackers`).
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
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from layerwatch.augment import max_view_length
from layerwatch.capture import max_positions, model_config
from layerwatch.monitor import all_ranks_max
from layerwatch.probe import PROBE_FILENAME
from layerwatch.registry import resolve_metrics
from layerwatch.trackers import tracker_sinks

logger = logging.getLogger(__name__)

__all__ = ["LayerWatchCallback"]

DEFAULT_MAX_LENGTH = 128
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
            ``probe_at_start``, ``tensorboard``, ``jsonl``, ``sinks``, ``collapse_threshold``, ``seed``, ...).

    Raises:
        ValueError: a bad ``every``, ``metrics``, ``batch_size``, ``num_prompts``, ``max_length``, ``alpha`` or
            ``max_overhead``.
        TypeError: an option :class:`layerwatch.LayerWatch` does not have, or a ``probe`` of an unusable type.

    At ``on_train_begin`` (on every rank alike, before the first step) a ``ValueError`` says so when no probe can be
    built: texts without a tokenizer, an iterable-only dataset, no dataset at all. Failures of the probe itself
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
        _check_positive_int(every, "every")
        _check_positive_int(batch_size, "batch_size")
        _check_positive_int(num_prompts, "num_prompts")
        if max_length is not None:
            _check_positive_int(max_length, "max_length")
        _check_probe_source(probe)
        _check_metrics(metrics)
        _check_watch_options(watch_options)
        self.every = every
        self.probe = probe
        self.logdir = None if logdir is None else os.fspath(logdir)
        self.stop_on_collapse = bool(stop_on_collapse)
        self.num_prompts = num_prompts
        self.max_length = max_length
        self.text_column = text_column
        self.watch_options: dict[str, Any] = dict(
            watch_options, metrics=metrics, layers=layers, batch_size=batch_size, strict=strict
        )
        self.watch: Any = None  # the layerwatch.LayerWatch of the current train() call
        self._start_step = 0
        self._is_main = True

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        from layerwatch import LayerWatch

        if self.watch is not None:  # a second train() call with the same callback
            self.watch.close()
            self.watch = None
        logdir = Path(self.logdir if self.logdir is not None else os.path.join(args.output_dir, "layerwatch"))
        self._start_step = int(state.global_step)
        self._is_main = bool(state.is_world_process_zero)
        model = kwargs.get("model")
        probe = self._get_probe(logdir, model, kwargs)
        options = dict(self.watch_options)
        if not self._is_main:  # guard the output, never the collective: the other ranks probe too but write nothing
            options["sinks"] = None
        else:  # follow report_to: W&B / MLflow runs the Trainer started get the scalars too (layerwatch.trackers)
            options["sinks"] = [*(options.get("sinks") or []), *tracker_sinks(getattr(args, "report_to", None))]
        # Resuming keeps the records up to the checkpoint's step; a run from step 0 is a fresh run (resume_step=-1):
        # a finished run in the same folder moves to <logdir>.previous-<time> (layerwatch.rundir), never deleted,
        # and a live writer there refuses it.
        resume_step = self._start_step if self._start_step > 0 else -1
        self.watch = LayerWatch(
            probe,
            logdir=str(logdir) if self._is_main else None,
            every=self.every,
            resume_step=resume_step,
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
            last = self.watch.last_probed_step
            if step > self._start_step and (last is None or last < step):
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

    def _get_probe(self, logdir: Path, model: Any, kwargs: Mapping[str, Any]) -> Any:
        from layerwatch import Probe

        tokenizer = _text_tokenizer(kwargs.get("processing_class") or kwargs.get("tokenizer"))
        source = self.probe
        saved = logdir / PROBE_FILENAME
        if isinstance(source, Probe):
            probe = source
        elif isinstance(source, (str, os.PathLike)):
            probe = Probe.load(source)
        elif _is_text_list(source):
            if tokenizer is None:
                raise ValueError(
                    "LayerWatchCallback(probe=<list of texts>) needs a tokenizer: pass processing_class=tokenizer to "
                    "the Trainer, or pass probe=layerwatch.Probe.from_texts(texts, tokenizer)"
                )
            probe = Probe.from_texts(
                list(source), tokenizer, max_length=self._max_length(model), num_prompts=self.num_prompts,
                seed=self._seed(),
            )
        elif source is not None:
            probe = self._from_dataset(source, tokenizer, model, "the dataset passed as probe=")
        elif self._start_step > 0 and saved.is_file():
            probe = Probe.load(saved)
            logger.info("layerwatch: resuming with the probe saved in %s", saved)
        else:
            dataset, origin = _find_dataset(kwargs)
            if dataset is None:
                raise ValueError(
                    "LayerWatchCallback found no dataset to build its probe from: pass probe= (a layerwatch.Probe, "
                    "a saved probe path, a list of texts or an indexable dataset)"
                )
            probe = self._from_dataset(dataset, tokenizer, model, origin)
        if self._start_step > 0 and source is not None and self._is_main and saved.is_file():
            try:
                views = resolve_metrics(self.watch_options["metrics"])[2]  # the views this preset feeds
                changed = Probe.load(saved).series_hash(views) != probe.series_hash(views)
            except Exception:  # noqa: BLE001 - only a comparison
                changed = False
            if changed:
                logger.warning(
                    "layerwatch: resuming with a probe that differs from the one in %s; the metrics before and "
                    "after step %d are not comparable", saved, self._start_step,
                )
        return probe

    def _from_dataset(self, dataset: Any, tokenizer: Any, model: Any, origin: str) -> Any:
        from layerwatch import Probe

        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError(
                f"LayerWatchCallback cannot build a probe from {origin} ({type(dataset).__name__}): it is not "
                "indexable (an IterableDataset?). Pass probe= (a layerwatch.Probe, a saved probe path, a list of "
                "texts or an indexable dataset)"
            )
        extra: dict[str, Any] = {}
        if tokenizer is None:  # a tokenized dataset and no processing_class: the model knows the vocabulary
            config = model_config(model) if model is not None else None
            vocab_size = getattr(config, "vocab_size", None)
            if vocab_size is None:
                raise ValueError(
                    f"LayerWatchCallback cannot build a probe from {origin} without a tokenizer and without "
                    "model.config.vocab_size; pass processing_class=tokenizer to the Trainer, or pass probe="
                )
            extra["vocab_size"] = int(vocab_size)
            pad = getattr(config, "pad_token_id", None)
            if isinstance(pad, int) and 0 <= pad < vocab_size:
                extra["pad_token_id"] = pad
        logger.info("layerwatch: building the probe from %s", origin)
        return Probe.from_dataset(
            dataset, tokenizer=tokenizer, text_column=self.text_column, num_prompts=self.num_prompts,
            max_length=self._max_length(model), seed=self._seed(), **extra,
        )

    def _max_length(self, model: Any) -> int:
        """``max_length``, or 128, capped so the prompt (and, for metrics that use them, its longest augmented view)
        fits the model's positions."""
        wanted = self.max_length if self.max_length is not None else DEFAULT_MAX_LENGTH
        positions = max_positions(model) if model is not None else None
        if positions is None:
            return wanted
        fitting = positions  # the longest prompt whose augmented views (which insert tokens) still fit
        uses_views = resolve_metrics(self.watch_options["metrics"])[2] > 0  # metrics="light" feeds no views
        while uses_views and fitting > 1 and max_view_length(fitting) > positions:
            fitting -= 1
        if fitting < wanted:
            if self.max_length is not None:
                logger.warning(
                    "layerwatch: max_length=%d lowered to %d: the model takes %d positions and augmented views are "
                    "longer than their prompts", wanted, fitting, positions,
                )
            return max(1, fitting)
        return wanted

    def _seed(self) -> int:
        return int(self.watch_options.get("seed", 0))


# ---------------------------------------------------------------------- module helpers


def _find_dataset(kwargs: Mapping[str, Any]) -> tuple[Any, str]:
    """The dataset to build a probe from: evaluation first, then training (see the module docstring)."""
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


def _is_text_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LayerWatchCallback: {name} must be a positive integer, got {value!r}")


def _check_probe_source(probe: Any) -> None:
    if probe is None or isinstance(probe, (str, os.PathLike)) or _is_text_list(probe):
        return
    from layerwatch import Probe

    if isinstance(probe, Probe):
        return
    if isinstance(probe, (list, tuple)):
        raise TypeError("LayerWatchCallback: probe= as a list must be a non-empty list of texts (str)")
    if isinstance(probe, Mapping):
        raise TypeError(
            "LayerWatchCallback: probe= got a mapping; pass a dataset of rows (datasets.Dataset, a list of dicts), "
            "a list of texts, a layerwatch.Probe or a saved probe path"
        )
    if not (hasattr(probe, "__len__") and hasattr(probe, "__getitem__")):
        raise TypeError(
            f"LayerWatchCallback: probe= must be a layerwatch.Probe, a saved probe path, a list of texts or an "
            f"indexable dataset; got {type(probe).__name__}"
        )


def _check_metrics(metrics: Any) -> None:
    from layerwatch.monitor import resolve_metrics

    try:
        resolve_metrics(metrics)
    except (ValueError, TypeError) as error:
        raise ValueError(f"LayerWatchCallback: bad metrics={metrics!r}: {error}") from None


def _check_watch_options(options: Mapping[str, Any]) -> None:
    from layerwatch import LayerWatch

    reserved = [name for name in options if name in _SET_BY_CALLBACK]
    if reserved:
        raise TypeError(
            f"LayerWatchCallback sets {', '.join(reserved)} itself; pass probe= and logdir= as its own arguments"
        )
    parameters = inspect.signature(LayerWatch).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(name for name in options if name not in parameters)
    if unknown and not open_ended:
        raise TypeError(
            f"LayerWatchCallback got unknown option(s) {', '.join(unknown)}; LayerWatch accepts "
            f"{', '.join(n for n in parameters if n not in _SET_BY_CALLBACK)}"
        )
    from layerwatch.schedule import ProbeSchedule

    try:
        ProbeSchedule(every=1, max_overhead=options.get("max_overhead"))
    except ValueError as error:
        raise ValueError(f"LayerWatchCallback: {error}") from None
    alpha = options.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(
            f"LayerWatchCallback: alpha must be a positive number (1 = von Neumann entropy), got {alpha!r}"
        )
