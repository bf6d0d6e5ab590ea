"""Checkpoint replay split between processes (issue 19 point 3): ``torchrun``, ``--shard K/N`` one after the other
and at the same time, a shard killed mid-way and rerun; each compared with a one-process replay (1e-6), CKA included.

The suite: six tiny GPT-2 checkpoints (random inits, one seed each) saved with ``save_pretrained``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from layerwatch import read_run
from layerwatch.analysis import shards
from layerwatch.analysis.trajectory import run_trajectory
from layerwatch.cli import main as layerwatch_main
from layerwatch.metrics import names
from tests.analysis.checkpoint_suite import save_checkpoints, save_probe

STEPS = (10, 20, 30, 40, 50, 60)
METRICS = "light"  # with cka_to_previous and cka_to_first, which need the shard's references
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    checkpoints = save_checkpoints(root / "out", steps=STEPS)
    probe = save_probe(root / "probe.safetensors")
    reference = run_trajectory([checkpoints], probe=probe, out=root / "one-process", metrics=METRICS, tensorboard=False)
    return {"root": root, "out": checkpoints, "probe": probe, "reference": reference}


def assert_same_run(run, reference, steps=STEPS):
    assert run.steps.tolist() == list(steps)
    rows = [reference.steps.tolist().index(step) for step in steps]
    assert set(run.metrics) == set(reference.metrics)
    for metric in reference.metrics:
        want, got = reference.metric(metric)[rows], run.metric(metric)
        assert (np.isnan(want) == np.isnan(got)).all(), metric
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=metric)
    # the CKA comparisons crossed the shard boundaries: only the replay's first step has no previous probe
    assert np.isnan(run.metric(names.CKA_TO_PREVIOUS)[0]).all() and np.isfinite(run.metric(names.CKA_TO_PREVIOUS)[1:]).all()


def argv(suite, out, *extra, inputs=None):
    inputs = inputs or [suite["out"]]
    return ["trajectory", *map(str, inputs), "--probe", str(suite["probe"]), "--out", str(out), "--metrics", METRICS,
            "--no-tensorboard", *map(str, extra)]


def command(*args):
    return [sys.executable, "-m", "layerwatch.cli", *args]


def part_steps(out, shard):
    path = shards.part_dir(out, shard) / "layerwatch.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]


def test_shard_blocks_and_launcher_environment():
    items = list(range(7))
    blocks = [shards.Shard(k, 3).take(items) for k in (1, 2, 3)]
    assert blocks == [[0, 1], [2, 3], [4, 5, 6]] and sum(blocks, []) == items
    assert shards.parse_shard(" 2/5 ") == shards.Shard(2, 5)
    assert shards.launcher_shard({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == shards.Shard(4, 4, 1)
    assert shards.launcher_shard({"RANK": "0", "WORLD_SIZE": "1"}) is None and shards.launcher_shard({}) is None
    for bad in ("0/2", "3/2", "2", "x/y"):
        with pytest.raises(ValueError):
            shards.parse_shard(bad)


@pytest.mark.slow
def test_torchrun_two_processes_replay_four_checkpoints_as_one_run(suite, tmp_path):
    out = tmp_path / "run"
    inputs = [suite["out"] / f"checkpoint-{step}" for step in STEPS[:4]]
    done = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--no-python", "layerwatch", *argv(suite, out, inputs=inputs)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(read_run(out), suite["reference"], STEPS[:4])
    assert part_steps(out, shards.Shard(1, 2)) == [10, 20] and part_steps(out, shards.Shard(2, 2)) == [30, 40]
    assert "run written to" in done.stdout  # the last process to finish merged and printed the run


@pytest.mark.slow
def test_two_shards_one_after_the_other(suite, tmp_path, capsys):
    out = tmp_path / "run"
    assert layerwatch_main(argv(suite, out, "--shard", "2/2")) == 0
    assert "shards done so far: [2]" in capsys.readouterr().out
    assert not (out / "layerwatch.jsonl").exists()  # not merged until every shard is done
    assert layerwatch_main(argv(suite, out, "--shard", "1/2")) == 0
    assert "run written to" in capsys.readouterr().out
    assert_same_run(read_run(out), suite["reference"])
    # a rerun of a finished shard probes nothing and leaves the run as it is
    lines = (out / "layerwatch.jsonl").read_text()
    assert layerwatch_main(argv(suite, out, "--shard", "1/2")) == 0
    assert "0 to probe" in capsys.readouterr().err and (out / "layerwatch.jsonl").read_text() == lines


@pytest.mark.slow
def test_two_shards_at_the_same_time_into_one_folder(suite, tmp_path):
    out = tmp_path / "run"
    jobs = [
        subprocess.Popen(command(*argv(suite, out, "--shard", f"{k}/2")), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for k in (1, 2)
    ]
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in results]
    assert sum("run written to" in stdout for stdout, _ in results) >= 1
    run = read_run(out)
    assert_same_run(run, suite["reference"])
    assert len((out / "layerwatch.jsonl").read_text().splitlines()) == len(STEPS)  # every checkpoint once


@pytest.mark.slow
def test_a_shard_killed_mid_way_reruns_only_its_missing_checkpoints(suite, tmp_path, capsys):
    out, second = tmp_path / "run", shards.Shard(2, 2)
    job = subprocess.Popen(command(*argv(suite, out, "--shard", "2/2")), env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not part_steps(out, second) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    probed = part_steps(out, second)
    assert 1 <= len(probed) < 3, f"the shard was not killed mid-way: {probed}"
    assert not (shards.part_dir(out, second) / shards.DONE_NAME).exists()
    capsys.readouterr()
    assert layerwatch_main(argv(suite, out, "--shard", "2/2")) == 0  # the rerun
    assert f"{len(probed)} already in {out}, {3 - len(probed)} to probe" in capsys.readouterr().err
    assert part_steps(out, second) == [40, 50, 60]
    assert layerwatch_main(argv(suite, out, "--shard", "1/2")) == 0
    assert_same_run(read_run(out), suite["reference"])


@pytest.mark.slow
def test_the_merged_run_has_tensorboard_events_and_a_report(suite, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    inputs = [suite["out"] / f"checkpoint-{step}" for step in STEPS[:2]]
    for k in (1, 2):
        args = [a for a in argv(suite, out, "--shard", f"{k}/2", inputs=inputs) if a != "--no-tensorboard"]
        assert layerwatch_main(args) == 0
    assert_same_run(read_run(out), suite["reference"], STEPS[:2])
    layer = EventAccumulator(str(out / "layer_00"))
    layer.Reload()
    assert [event.step for event in layer.Scalars(f"layerwatch/{names.PROMPT_ENTROPY}")] == [10, 20]
    assert not list((out / "shards").rglob("events.out.tfevents.*"))  # parts write no TensorBoard files
    assert layerwatch_main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
