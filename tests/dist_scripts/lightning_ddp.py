"""Lightning under DDP (strategy="ddp", CPU, gloo), 2 processes started by Lightning's own launcher.

Run as ``python tests/dist_scripts/lightning_ddp.py OUTDIR``: Lightning starts the second process by running this
script again (``LOCAL_RANK=1``). Fit A has no callback, fit B has LayerWatchCallback (every=2, 4 steps, gradient
accumulation 2) from the same weights and seed. Each rank writes ``OUTDIR/result_rank<R>.json``: both fits'
per-micro-batch losses on that rank, and the steps at which it probed.
"""

from __future__ import annotations

import json
import os

import _common as C
import torch

import lightning.pytorch as pl

from layerwatch.integrations.lightning import LayerWatchCallback


class TinyLM(pl.LightningModule):
    def __init__(self, state) -> None:
        super().__init__()
        self.model = C.model_from_state(state)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class ProbedSteps(pl.Callback):
    """After layerwatch's callback: the steps at which this rank's monitor probed."""

    def __init__(self, watch_callback: LayerWatchCallback) -> None:
        self.watch_callback, self.steps = watch_callback, []

    def on_train_batch_end(self, trainer, *args) -> None:
        last = self.watch_callback.watch.last_probed_step
        if last is not None and last > 0 and last not in self.steps:
            self.steps.append(int(last))


def fit(out: str, name: str, state, callbacks=()) -> tuple[pl.Trainer, TinyLM]:
    pl.seed_everything(0, verbose=False)
    data = torch.randint(1, C.VOCAB, (64, C.SEQ), generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
    module = TinyLM(state)
    trainer = pl.Trainer(
        default_root_dir=os.path.join(out, name), max_steps=4, accumulate_grad_batches=2, accelerator="cpu",
        devices=2, strategy="ddp", callbacks=list(callbacks), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=pl.loggers.CSVLogger(os.path.join(out, name), name="lightning_logs"),
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer, module


def main() -> None:
    out = C.outdir()
    state = C.initial_state()
    _, plain = fit(out, "plain", state)
    watch = LayerWatchCallback(
        probe=C.make_probe(), every=2, batch_size=C.PROBE_BATCH, metrics=["prompt_entropy", "dataset_entropy"]
    )
    probed = ProbedSteps(watch)
    trainer, watched = fit(out, "watched", state, [watch, probed])
    result = {"plain": plain.losses, "watched": watched.losses, "probed": probed.steps}
    with open(os.path.join(out, f"result_rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(result, handle)

if __name__ == "__main__":
    main()
