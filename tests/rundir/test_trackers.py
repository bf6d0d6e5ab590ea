"""The Trainer callback follows ``report_to``: layerwatch's scalars in W&B (offline) and MLflow (local file store).

Real clients, read back from what they wrote on disk; skipped where the client is not installed
(``pip install -e ".[trackers]"``).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from models import TINY_VOCAB, tiny_model
from transformers import Trainer

import layerwatch
from layerwatch.cli.demo import training_arguments
from layerwatch.integrations.hf_trainer import LayerWatchCallback

STEPS = 4
PROBED = [1, 2, 4]  # log-spaced start and the last step, with every=4
TAG = "layerwatch/{}/layer_{:02d}"


def train(out: Path, report_to: list[str]) -> Trainer:
    ids = torch.randint(0, TINY_VOCAB, (32, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row.clone()} for row in ids]
    trainer = Trainer(
        model=tiny_model("gpt2", seed=0).train(),
        args=training_arguments(
            str(out), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
            seed=0, disable_tqdm=True, report_to=report_to,
        ),
        train_dataset=rows,
        callbacks=[LayerWatchCallback(every=4, num_prompts=8, batch_size=8, metrics="light")],
    )
    trainer.train()
    return trainer


def check_series(series: dict[str, dict[int, float]], trainer: Trainer, logdir: Path) -> None:
    """Every per-layer scalar of the run directory appears in the tracker at the same steps with the same value."""
    run = layerwatch.read_run(logdir)
    assert run.steps.tolist() == PROBED
    for name in ("prompt_entropy", "dataset_entropy", "curvature", "rms"):
        expected = run.metric(name)
        for column, layer in enumerate(run.layers):
            logged = series.get(TAG.format(name, layer), {})
            assert sorted(logged) == PROBED, (name, layer, logged)
            np.testing.assert_allclose([logged[s] for s in PROBED], expected[:, column], rtol=1e-6)
    assert sorted(series["layerwatch/probe_seconds"]) == PROBED
    # The Trainer's own history stays as it was: no layerwatch numbers in trainer_state.json.
    assert not any(key.startswith("layerwatch") for entry in trainer.state.log_history for key in entry)
    assert any("loss" in entry for entry in trainer.state.log_history)


# --------------------------------------------------------------------------------------------- Weights & Biases


def read_wandb_history(run_file: Path, timeout_s: float = 60.0) -> list[dict]:
    """History rows of an offline ``run-*.wandb`` file, once W&B's writer process has written its exit record."""
    deadline = time.monotonic() + timeout_s
    records = wandb_records(run_file.read_bytes())
    # wandb.finish() can return before W&B's writer process has written the whole file.
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = wandb_records(run_file.read_bytes())
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def wandb_records(data: bytes) -> list:
    """The ``wandb_internal_pb2.Record`` messages in a ``.wandb`` file (LevelDB-log framing)."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    block, position, pieces, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 or position + 7 + length > len(data):  # zero padding, or a record still being written
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk  # full / first / middle / last
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pieces))
    return records


def test_wandb_offline_run_gets_per_layer_scalars_on_the_trainer_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_PROJECT": "layerwatch",
        "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        trainer = train(tmp_path / "out", ["wandb"])
    finally:
        wandb.finish()  # the Trainer leaves the run open (for a later evaluate()); finishing flushes the file
    (run_file,) = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    series: dict[str, dict[int, float]] = {}
    for row in read_wandb_history(run_file):
        for key, value in row.items():
            if key.startswith("layerwatch/"):
                series.setdefault(key, {})[int(row["train/global_step"])] = value
    check_series(series, trainer, tmp_path / "out" / "layerwatch")


# ------------------------------------------------------------------------------------------------------- MLflow


def test_mlflow_file_store_run_gets_per_layer_scalars_on_the_trainer_step(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "layerwatch")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x wants an opt-in for the file store
    trainer = train(tmp_path / "out", ["mlflow"])
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("layerwatch")
    (run,) = client.search_runs([experiment.experiment_id])
    series = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in run.data.metrics
        if key.startswith("layerwatch/")
    }
    check_series(series, trainer, tmp_path / "out" / "layerwatch")


def test_no_tracker_writers_without_an_active_run_or_report_to():
    from layerwatch.rundir.trackers import tracker_writers

    assert tracker_writers(None) == [] and tracker_writers([]) == [] and tracker_writers("none") == []
    mlflow = pytest.importorskip("mlflow")
    assert mlflow.active_run() is None
    assert tracker_writers(["mlflow"]) == []  # named, but no run was started: nothing to follow

# Trainer runs, subprocesses and real disk faults: out of the quick loop (`-m "not slow"`).
pytestmark = pytest.mark.slow
