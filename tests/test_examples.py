"""Every example script runs as a user runs it (a subprocess, few steps) and leaves a layerwatch run behind.

Training examples take ``--out DIR --steps N``; ``checkpoint_trajectory.py`` analyses the checkpoints that
``trainer_pretraining.py`` saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import layerwatch
from helpers import EXAMPLES, run_script

TRAINING_EXAMPLES = ("trainer_pretraining.py", "accelerate_loop.py", "plain_pytorch_loop.py")
PRESENT = [name for name in TRAINING_EXAMPLES if (EXAMPLES / name).is_file()]
pytestmark = pytest.mark.slow  # subprocesses running whole example scripts
STEPS = 8


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """Runs each training example at most once per session; returns its output folder."""
    cache: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in cache:
            work = tmp_path_factory.mktemp(name.removesuffix(".py"))
            run_script(name, "--out", str(work / "out"), "--steps", str(STEPS), cwd=work)
            cache[name] = work / "out"
        return cache[name]

    return run


@pytest.mark.parametrize("name", PRESENT)
def test_training_example_writes_a_run(name, example_runs):
    out = example_runs(name)
    logs = sorted(out.rglob("layerwatch.jsonl"))
    assert logs, f"{name} wrote no layerwatch.jsonl under {out}"
    run = layerwatch.read_run(logs[0].parent)
    assert len(run.records) >= 1
    assert run.steps.max() <= STEPS
    assert len(run.layers) >= 2 and "prompt_entropy" in run.metrics
    assert not [a for r in run.records for a in r.alerts if a.startswith("collapse")]  # healthy runs never alarm


@pytest.mark.skipif(
    not (EXAMPLES / "checkpoint_trajectory.py").is_file() or "trainer_pretraining.py" not in PRESENT,
    reason="needs examples/checkpoint_trajectory.py and examples/trainer_pretraining.py",
)
def test_checkpoint_trajectory_example_on_trainer_checkpoints(example_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = example_runs("trainer_pretraining.py")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS // 2}", f"checkpoint-{STEPS}"]
    run_script("checkpoint_trajectory.py", str(out), "--out", str(tmp_path / "trajectory"), cwd=tmp_path)
    run = layerwatch.read_run(tmp_path / "trajectory")
    assert run.steps.tolist() == [STEPS // 2, STEPS]
    # The last checkpoint holds the weights the training-time probe saw at the last step.
    live = layerwatch.read_run(out / "layerwatch")
    assert live.steps[-1] == STEPS
    assert abs(run.metric("prompt_entropy")[-1] - live.metric("prompt_entropy")[-1]).max() < 1e-4
