"""``layerwatch demo`` end to end, in a subprocess as a user runs it (a tiny budget: 20 steps)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import layerwatch
from layerwatch.cli import demo


def test_corpus_is_packaged_clean_english():
    text = demo.load_corpus()
    assert len(text) > 1_000_000
    assert text.startswith("First Citizen:")
    assert "# " not in text.splitlines()[0] and "Licence" not in text[:2000]
    assert text.isascii() and "\r" not in text


def test_tokenizer_and_blocks():
    text = demo.load_corpus()[:50_000]
    tokenizer = demo.train_tokenizer(text, vocab_size=400)
    assert len(tokenizer) <= 400
    assert tokenizer.decode(tokenizer("To be, or not to be")["input_ids"]) == "To be, or not to be"
    train, valid = demo.build_datasets(text, tokenizer, block_size=32, eval_fraction=0.1)
    assert len(train) > 5 * len(valid) > 0
    item = train[0]
    assert item["input_ids"].shape == (32,) and item["input_ids"].equal(item["labels"])


def run_demo(out, *extra, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "layerwatch.cli", "demo", "--out", str(out), *extra],
        capture_output=True, text=True, env=env, timeout=600, cwd=cwd,
    )


def test_demo_trains_and_writes_a_run(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("demo", "--steps", "20", "--every", "10", "--batch-size", "4", "--prompts", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    # Four checkpoints (safetensors) for the trajectory command, and the layerwatch run.
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-10", "checkpoint-15", "checkpoint-20", "checkpoint-5"]
    assert all((out / name / "model.safetensors").is_file() for name in checkpoints)
    logdir = out / "layerwatch"
    assert (logdir / "probe.safetensors").is_file()
    assert list(logdir.glob("all_layers/events.out.tfevents.*"))
    run = layerwatch.read_run(logdir)
    assert run.steps.tolist() == [1, 2, 4, 8, 10, 20]
    assert run.layers == [0, 1, 2, 3, 4]
    assert not [a for r in run.records for a in r.alerts if a.startswith("collapse")]  # a healthy run
    # What the user is told: where the logs are, how to view them, and the first -> last table.
    assert f"tensorboard --logdir {logdir.resolve()}\n" in stdout  # absolute: works from any folder
    assert "Training loss" in stdout and "Checkpoints:" in stdout
    assert "first probe (step 1) -> last probe (step 20)" in stdout
    table = [line for line in stdout.splitlines() if re.match(r"^\s*\d+\s+\S+ -> \S+", line)]
    assert [int(line.split()[0]) for line in table] == [0, 1, 2, 3, 4]  # one row per layer, embeddings first
    assert "layers that changed most" in stdout
    # A quiet console: no transformers warnings caused by the demo's config, one progress bar (no nested bars,
    # which tqdm draws with the cursor-up escape), log lines above it.
    stderr = result.stderr
    for noise in ("[transformers]", "bos_token_id", "eos_token_id", "loss_type", "\x1b[A", "Writing model shards"):
        assert noise not in stderr, f"{noise!r} in the demo's stderr:\n{stderr[-3000:]}"
    assert "training: 100%" in stderr and "{'loss'" not in stdout
    # The loss went down.
    losses = [float(part.split()[0]) for part in stdout.split("Training loss ")[1].split(";")[0].split(" -> ")]
    assert losses[1] < losses[0]


def test_demo_refuses_a_foreign_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_demo(tmp_path, "--steps", "1")
    assert result.returncode == 2
    assert "--overwrite" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("flag", ["--steps", "--every", "--batch-size", "--prompts"])
def test_demo_rejects_non_positive_numbers(flag, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.main(parser.parse_args([flag, "0"])) == 2
    assert flag in capsys.readouterr().err

# Checkpoints, subprocesses and full HTML reports: out of the quick loop (`-m "not slow"`).
pytestmark = pytest.mark.slow
