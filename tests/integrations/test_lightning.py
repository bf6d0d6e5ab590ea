"""LayerWatchCallback for Lightning, with the real ``lightning.pytorch`` Trainer on CPU and tiny GPT-2 models."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from models import TINY_VOCAB, tiny_model  # noqa: E402

import layerwatch  # noqa: E402
from layerwatch.integrations.lightning import BEST_LAYER, COLLAPSE_ALERT, LayerWatchCallback  # noqa: E402

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ = 12
STEPS = 6
TAG = "layerwatch/prompt_entropy/layer_01"
METRICS = ["prompt_entropy", "probe_accuracy"]


class TinyLM(pl.LightningModule):
    """A tiny GPT-2 (dropout 0.1, so a probe that moved the RNG would change the losses); keeps its losses."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_model("gpt2", seed=0, dropout=0.1).train()
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def rows(count, low, seed, labels=False):
    ids = torch.randint(low, TINY_VOCAB, (count, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, **({"label": i % 2} if labels else {})} for i, row in enumerate(ids)]


def fit(root, callbacks=(), *, steps=STEPS, version=0, ckpt_path=None, module=None, checkpoint_every=None):
    pl.seed_everything(0, verbose=False)
    module = module or TinyLM()
    loader = torch.utils.data.DataLoader(rows(64, 1, seed=0), batch_size=4, shuffle=True)
    extra = [] if checkpoint_every is None else [pl.callbacks.ModelCheckpoint(
        dirpath=os.path.join(root, "ckpt"), every_n_train_steps=checkpoint_every, save_top_k=-1)]
    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(
            root, name="csv", version=version), callbacks=[*callbacks, *extra], enable_checkpointing=bool(extra),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, module


def expected_steps(last, every=2):
    """log_spaced_start (1, 2, 4, ...) plus every ``every`` steps plus the last step (independent of the schedule)."""
    return sorted({s for s in range(1, last + 1) if (s & (s - 1)) == 0 or s % every == 0} | {last})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    _, plain = fit(str(root / "plain"))
    callback = LayerWatchCallback(
        probe=rows(10, 64, seed=1, labels=True), label_column="label", every=2, batch_size=4, metrics=METRICS
    )
    trainer, watched = fit(str(root / "watched"), [callback])
    return trainer, plain, watched, callback


def test_losses_are_bit_identical_with_the_callback(runs):
    _, plain, watched, _ = runs
    assert len(plain.losses) == 2 * STEPS  # accumulate_grad_batches=2: two micro-batches per optimizer step
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, watched.losses, strict=True))


def test_probes_at_global_step_after_the_optimizer_steps(runs):
    trainer, _, watched, _ = runs
    logdir = os.path.join(trainer.log_dir, "layerwatch")  # <trainer.log_dir>/layerwatch
    run = layerwatch.read_run(logdir)
    assert list(run.steps) == expected_steps(STEPS) == [1, 2, 4, 6]
    reference = layerwatch.LayerWatch(
        layerwatch.Probe.load(os.path.join(logdir, "probe.safetensors")), logdir=None, batch_size=4,
        metrics=METRICS,
    ).run(watched.model, STEPS)  # the trained weights, probed afresh: the last probe came after the last update
    np.testing.assert_allclose(run.metric("prompt_entropy")[-1], reference.metrics["prompt_entropy"], rtol=1e-5)


def test_callback_metrics_hold_the_summaries(runs):
    trainer, _, _, _ = runs
    run = layerwatch.read_run(os.path.join(trainer.log_dir, "layerwatch"))
    metrics = trainer.callback_metrics
    assert float(metrics[COLLAPSE_ALERT]) == 0.0
    assert float(metrics[BEST_LAYER]) == run.records[-1].scalars["best_layer"]


def test_the_trainer_loggers_receive_the_scalars(runs):
    trainer, _, _, _ = runs
    run = layerwatch.read_run(os.path.join(trainer.log_dir, "layerwatch"))
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as handle:
        logged = [row for row in csv.DictReader(handle) if row.get(TAG)]
    assert [int(row["step"]) for row in logged] == list(run.steps)
    np.testing.assert_allclose([float(row[TAG]) for row in logged], [r.metrics["prompt_entropy"][1] for r in run.records])


def test_resume_from_a_checkpoint_continues_the_series_without_duplicates(tmp_path):
    probe = rows(6, 64, seed=1)
    fit(str(tmp_path), [LayerWatchCallback(probe=probe, every=2, batch_size=4, metrics=["prompt_entropy"])], checkpoint_every=3)
    first = os.path.join(tmp_path, "csv", "version_0", "layerwatch")
    assert list(layerwatch.read_run(first).steps) == [1, 2, 4, 6]
    checkpoint = os.path.join(tmp_path, "ckpt", "epoch=0-step=3.ckpt")
    assert torch.load(checkpoint, weights_only=False)["callbacks"]  # the callback's state is in the checkpoint
    # A new logger version: the resumed run still continues the series in the folder its checkpoint names.
    fit(str(tmp_path), [LayerWatchCallback(probe=probe, every=2, batch_size=4, metrics=["prompt_entropy"])], steps=8, version=1,
        ckpt_path=checkpoint)
    with open(os.path.join(first, "layerwatch.jsonl")) as handle:
        steps = [json.loads(line)["step"] for line in handle if line.strip()]
    assert steps == [1, 2, 4, 6, 8]  # 4 and 6 of the first run dropped, probed again after the resume
    assert not os.path.exists(os.path.join(tmp_path, "csv", "version_1", "layerwatch"))


def test_ddp_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(HERE), "dist_scripts", "lightning_ddp.py")
    done = subprocess.run([sys.executable, script, str(tmp_path)], env=env, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count("tensorboard --logdir") == 1  # the start-up line, from rank zero, with no logging set up
    results = []
    for rank in (0, 1):
        with open(tmp_path / f"result_rank{rank}.json") as handle:
            results.append(json.load(handle))
    for result in results:  # bit-identical losses on each rank (floats through JSON keep every bit)
        assert result["plain"] == result["watched"] and len(result["plain"]) == 8
        assert result["probed"] == expected_steps(4)  # every rank probes (the forward is collective)
    logdir = tmp_path / "watched" / "lightning_logs" / "version_0" / "layerwatch"
    assert list(layerwatch.read_run(logdir).steps) == expected_steps(4)
    assert [p.parent for p in tmp_path.rglob("layerwatch.jsonl")] == [logdir]  # rank zero writes, once
