"""PyTorch Lightning integration (``lightning.pytorch`` 2.x, or ``pytorch_lightning``): one callback.

    from layerwatch.integrations.lightning import LayerWatchCallback

    trainer = lightning.Trainer(max_steps=1000, callbacks=[LayerWatchCallback(probe=eval_dataset, every=100)])

- Probes at ``trainer.global_step`` after optimizer steps (``on_train_batch_end`` when the step advanced, so with
  ``accumulate_grad_batches`` once per optimizer step), on every rank (DDP, FSDP, DeepSpeed: sharded models need
  every rank in each forward); global rank zero writes. The last step is probed at ``on_train_end``.
- Probes the Hugging Face model inside the ``LightningModule``, else the module (under FSDP the strategy's root,
  whose forward is the module's; ``layers=`` and ``forward_inputs=`` adapt other models). ``probe=``: as for the
  Trainer callback (texts with ``tokenizer=``); ``None``: the validation, else training, dataloader's dataset.
- Writes to ``<trainer.log_dir or trainer.default_root_dir>/layerwatch`` and sends the scalars, under the same
  names, to the Trainer's loggers (TensorBoard, CSV, W&B, MLflow, ...: ``logger.log_metrics``).
- Puts :data:`BEST_LAYER` (``layerwatch/best_layer``, where the metrics give one) and :data:`COLLAPSE_ALERT`
  (``layerwatch/collapse_alert``: 1.0 from the probe that raised a collapse alert on, else 0.0) into
  ``trainer.callback_metrics`` for ``ModelCheckpoint`` and ``EarlyStopping`` to monitor.
- Its state (schedule, run directory, the alert) goes into Lightning checkpoints, so ``fit(ckpt_path=...)``
  continues the same series in the same folder, dropping records written after the checkpoint's step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from layerwatch.metrics import names
from layerwatch.monitor import session
from layerwatch.monitor.capture import find_pretrained
from layerwatch.rundir.record import SCALAR_PREFIX

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as error:
        raise ImportError("layerwatch's Lightning callback needs Lightning: pip install 'layerwatch[lightning]'") from error

__all__ = ["BEST_LAYER", "COLLAPSE_ALERT", "LayerWatchCallback"]

BEST_LAYER = f"{SCALAR_PREFIX}/{names.BEST_LAYER}"
COLLAPSE_ALERT = f"{SCALAR_PREFIX}/collapse_alert"


class LayerWatchCallback(Callback):
    """Probes every layer every ``every`` optimizer steps of a Lightning run; see the module docstring.

    Args: as :class:`layerwatch.integrations.hf_trainer.LayerWatchCallback` (``every``, ``probe``, ``logdir``,
    ``metrics``, ``layers``, ``batch_size``, ``strict``, ``stop_on_collapse`` (sets ``trainer.should_stop``),
    ``num_prompts``, ``max_length``, ``text_column``, ``label_column``, ``**watch_options``), plus ``tokenizer``
    (for texts, and text datasets) and ``log_to_loggers`` (default ``True``).
    """

    def __init__(
        self, every: int = 100, *, probe: Any = None, logdir: str | os.PathLike | None = None,
        metrics: str | Sequence[str] = "standard", layers: str | Sequence[Any] | None = None, batch_size: int = 16,
        strict: bool = False, stop_on_collapse: bool = False, num_prompts: int = 64, max_length: int | None = None,
        text_column: str = "text", label_column: str | None = None, tokenizer: Any = None,
        log_to_loggers: bool = True, **watch_options: Any,
    ) -> None:
        self.options = session.adapter_options(
            "LayerWatchCallback", every, probe=probe, logdir=logdir, num_prompts=num_prompts, max_length=max_length,
            watch=dict(watch_options, metrics=metrics, layers=layers, batch_size=batch_size, strict=strict),
            text_column=text_column, label_column=label_column, stop_on_collapse=stop_on_collapse,
        )
        self.tokenizer, self.log_to_loggers = tokenizer, log_to_loggers
        self.watch: Any = None
        self._restored: dict[str, Any] = {}
        self._start_step = self._seen_step = 0
        self._collapsed = False
        self._logdir: str | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.watch is not None:  # a second fit() with the same callback: close the first (close() is None)
            self.watch = self.watch.close()
        base = trainer.log_dir or trainer.default_root_dir  # log_dir is a broadcast: every rank asks
        self._start_step = self._seen_step = int(trainer.global_step)
        restored = self._restored if self._start_step else {}  # a resumed fit continues its checkpoint's folder
        self._logdir = self.options.logdir or restored.get("logdir") or session.default_logdir(base)
        self._collapsed = bool(restored.get("collapsed", False))
        loggers = list(trainer.loggers) if self.log_to_loggers and trainer.is_global_zero else []
        writer = session.ScalarsWriter(lambda values, step: [log.log_metrics(values, step=step) for log in loggers])
        self.watch = session.start_watch(
            self.options, model=_probe_target(trainer, pl_module), base_dir=base, logdir=self._logdir,
            start_step=self._start_step, is_main=trainer.is_global_zero, tokenizer=self.tokenizer,
            find_dataset=lambda: _find_dataset(trainer), trackers=[writer] if loggers else (),
        )
        if restored.get("watch") is not None:
            self.watch.load_state_dict(restored["watch"])
        if self._start_step == 0 and self.watch.should_probe(0):  # probe_at_start=True
            self._after_probe(trainer, pl_module, self.watch.run(_probe_target(trainer, pl_module), 0), 0)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if self.watch is None or step <= self._seen_step:  # no optimizer step since the last call
            return
        self._seen_step = step
        record = self.watch.step(_probe_target(trainer, pl_module), step)
        if self.watch.last_probed_step == step:
            self._after_probe(trainer, pl_module, record, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.watch is None:
            return
        step = int(trainer.global_step)
        try:
            if session.final_probe_due(self.watch.last_probed_step, step, self._start_step):
                self._after_probe(trainer, pl_module, self.watch.run(_probe_target(trainer, pl_module), step), step)
        finally:
            self.watch.close()
            self.watch = None

    def _after_probe(self, trainer: Any, pl_module: Any, record: Any, step: int) -> None:
        self._collapsed = self._collapsed or session.collapse_raised(record)
        metrics = trainer.callback_metrics
        metrics[COLLAPSE_ALERT] = torch.tensor(float(self._collapsed))
        if record is not None and names.BEST_LAYER in record.scalars:
            metrics[BEST_LAYER] = torch.tensor(float(record.scalars[names.BEST_LAYER]))
        if self.options.stop_on_collapse and session.stop_requested(record, step):
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        watch = self.watch.state_dict() if self.watch is not None else self._restored.get("watch")
        return {"version": 1, "logdir": self._logdir, "collapsed": self._collapsed, "watch": watch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)


def _probe_target(trainer: Any, pl_module: Any) -> Any:
    """The FSDP root under FSDP (its pre-forward gathers the shards), else the Hugging Face model inside the
    ``LightningModule`` (else the module): not the DDP wrapper, whose forward runs ``training_step``."""
    root = getattr(trainer.strategy, "model", None)
    if type(root).__name__ == "FullyShardedDataParallel":
        return root
    return find_pretrained(pl_module) or pl_module


def _find_dataset(trainer: Any) -> tuple[Any, str]:
    """The validation dataloader's dataset, else the training dataloader's (attribute access only)."""
    for loaders, origin in ((trainer.val_dataloaders, "the validation dataset"),
                            (trainer.train_dataloader, "the training dataset")):
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            return dataset, origin
    return None, ""
