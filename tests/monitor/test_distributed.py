"""Real multi-process runs: ``torchrun --nproc_per_node 2`` on CPU with gloo, one job per backend family.

Each job (a script in tests/dist_scripts/) runs several checks and writes ``result_rank<R>.json``; the tests below
assert on those and on the run directories. The jobs run once per module (fixtures) with a hard timeout, and the
workers use a 60 s gloo timeout, so a hang fails instead of blocking CI.

- accelerate_ddp.py: Accelerate (MULTI_CPU, i.e. DDP) + LayerWatchAccelerate, gradient accumulation 2, a probe that
  fails on rank 1 only at step 2.
- fsdp.py: FSDP1 (transformer auto-wrap, ``device_id=cpu``) and FSDP2 (``fully_shard`` on a CPU mesh).
- trainer_ddp.py: the Hugging Face Trainer under DDP with LayerWatchCallback.
"""

from __future__ import annotations

import glob
import os
import re

import pytest
from dist_jobs import NEEDS_GLOO, assert_matches_reference, jsonl_steps, run_job
from models import FSDP2_ON_CPU

NEEDS_FSDP2_ON_CPU = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 (fully_shard) runs on a CPU from torch 2.6 on")
pytestmark = [pytest.mark.slow, NEEDS_GLOO]


@pytest.fixture(scope="module")
def accelerate_job(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("accelerate_ddp"))
    return outdir, run_job("accelerate_ddp.py", outdir)


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("fsdp"))
    return outdir, run_job("fsdp.py", outdir)


@pytest.fixture(scope="module")
def trainer_job(tmp_path_factory):
    pytest.importorskip("transformers")
    outdir = str(tmp_path_factory.mktemp("trainer_ddp"))
    return outdir, run_job("trainer_ddp.py", outdir)


# ------------------------------------------------------------------------------------------------ helpers


def _assert_single_writer(outdir: str, logdir: str, steps: list[int]) -> None:
    """One JSONL and one TensorBoard writer in the whole job, in ``logdir``, with the expected steps.

    The writer makes one event file in each of its runs: ``logdir/all_layers``, each layer's ``logdir/layer_NN``
    and the threshold line's run.
    """
    events = glob.glob(os.path.join(outdir, "**", "events.out.tfevents.*"), recursive=True)
    directories = sorted(os.path.relpath(os.path.dirname(path), logdir) for path in events)
    assert len(set(directories)) == len(directories) and "all_layers" in directories, events
    assert all(re.fullmatch(r"layer_\d\d|all_layers|bimodality_threshold_5_9", d) for d in directories), events
    assert len(directories) > 1, events
    jsonls = glob.glob(os.path.join(outdir, "**", "layerwatch.jsonl"), recursive=True)
    assert jsonls == [os.path.join(logdir, "layerwatch.jsonl")], jsonls
    recorded = jsonl_steps(logdir)
    assert len(recorded) == len(set(recorded)), f"duplicate steps in the JSONL: {recorded}"
    assert recorded == steps


# ------------------------------------------------------------------------------------- Accelerate + DDP


def test_accelerate_ddp_writes_one_run_on_the_main_process(accelerate_job):
    outdir, results = accelerate_job
    # Probes at 0 (baseline), 1, 2 (failed on rank 1: skipped by both), 4.
    _assert_single_writer(outdir, results[0]["logdir"], [0, 1, 4])


def test_accelerate_ddp_metrics_equal_single_process(accelerate_job):
    _, results = accelerate_job
    assert_matches_reference(results[0]["logdir"], 0, results[0]["reference"])


def test_accelerate_ddp_training_losses_unchanged(accelerate_job):
    _, results = accelerate_job
    for rank, result in results.items():
        assert len(result["losses_watch"]) == 8, rank
        assert result["losses_watch"] == result["losses_plain"], f"rank {rank}"


def test_accelerate_ddp_counts_optimizer_steps(accelerate_job):
    _, results = accelerate_job
    for rank, result in results.items():
        assert [c["optimizer_step"] for c in result["calls"]] == [0, 1, 1, 2, 2, 3, 3, 4], rank
        assert [c["probed"] for c in result["calls"]] == [False, True, False, False, False, False, False, True], rank
        assert result["last_probed_step"] == 4


def test_accelerate_ddp_probes_the_inner_module_and_keeps_ddp_state(accelerate_job):
    _, results = accelerate_job
    for rank, result in results.items():
        assert result["probe_module"] == "LlamaForCausalLM", rank
        assert result["step0_probed"] and result["sync_after_step0"], rank
        for call in result["calls"]:
            if call["sync_gradients"]:  # after the updating micro-batch DDP's flag is True; a probe must keep it
                assert call["sync_before"] and call["sync_after"], (rank, call)


def test_exception_on_one_rank_skips_the_probe_on_all_ranks(accelerate_job):
    _, results = accelerate_job
    assert results[0]["hook_fired"] == 0
    assert results[1]["hook_fired"] > 0, "the injected failure never fired"
    for rank, result in results.items():
        step2 = [c for c in result["calls"] if c["optimizer_step"] == 2 and c["sync_gradients"]]
        assert [c["probed"] for c in step2] == [False], rank  # skipped on both ranks, no hang
        assert result["calls"][-1]["probed"], rank  # and the next scheduled probe works again


# ---------------------------------------------------------------------------------------- FSDP1, FSDP2


@pytest.mark.parametrize("flavour", ["fsdp1", pytest.param("fsdp2", marks=NEEDS_FSDP2_ON_CPU)])
def test_fsdp_writes_one_run_and_matches_single_process(fsdp_job, flavour):
    outdir, results = fsdp_job
    logdir = os.path.join(outdir, flavour)
    events = glob.glob(os.path.join(logdir, "all_layers", "events.out.tfevents.*"))
    assert len(events) == 1, events
    steps = jsonl_steps(logdir)
    assert steps == [0, 1, 2]
    assert_matches_reference(logdir, 0, results[0]["reference"])
    for rank, result in results.items():
        assert result[flavour]["probed"] == [0, 1, 2], rank
        assert result[flavour]["probe_module_is_wrapped"], rank
        assert all(result[flavour]["training_after_probe"]), rank


def test_fsdp_job_has_no_other_writers(fsdp_job):
    outdir, _ = fsdp_job
    events = glob.glob(os.path.join(outdir, "**", "events.out.tfevents.*"), recursive=True)
    runs = [os.path.relpath(os.path.dirname(path), outdir).split(os.sep) for path in events]
    expected = ["fsdp1", "fsdp2"] if FSDP2_ON_CPU else ["fsdp1"]
    assert sorted(run[0] for run in runs if run[1:] == ["all_layers"]) == expected  # one writer per run directory
    assert all(len(run) == 2 and re.fullmatch(r"layer_\d\d|all_layers|bimodality_threshold_5_9", run[1]) for run in runs), runs


@pytest.mark.parametrize("flavour", ["fsdp1", pytest.param("fsdp2", marks=NEEDS_FSDP2_ON_CPU)])
def test_fsdp_training_losses_unchanged(fsdp_job, flavour):
    _, results = fsdp_job
    for rank, result in results.items():
        assert result[f"{flavour}_losses_watch"] == result[f"{flavour}_losses_plain"], f"rank {rank}"


def test_fsdp1_root_is_probed_not_the_inner_module(fsdp_job):
    _, results = fsdp_job
    for rank, result in results.items():
        assert result["fsdp1"]["rejects_inner_module"], rank


@NEEDS_FSDP2_ON_CPU
def test_fsdp2_parameters_are_dtensors_again_after_each_probe(fsdp_job):
    _, results = fsdp_job
    for rank, result in results.items():
        assert result["fsdp2"]["dtensor_after_probe"] == [True, True, True], rank


# ------------------------------------------------------------------------------------------ Trainer + DDP


def test_trainer_ddp_writes_one_run_and_matches_single_process(trainer_job):
    outdir, results = trainer_job
    logdir = results[0]["logdir"]
    _assert_single_writer(outdir, logdir, [1, 2, 4])  # every=2, log-spaced start, and the last step
    assert_matches_reference(logdir, 4, results[0]["reference"])  # DDP: final weights identical on all ranks


def test_trainer_ddp_training_losses_unchanged(trainer_job):
    _, results = trainer_job
    for rank, result in results.items():
        assert len(result["losses_watch"]["micro"]) == 8, rank  # 4 steps x 2 accumulation micro-batches
        assert result["losses_watch"] == result["losses_plain"], f"rank {rank}"


def test_trainer_ddp_keeps_require_forward_param_sync(trainer_job):
    _, results = trainer_job
    for rank, result in results.items():
        probed = [entry["step"] for entry in result["after_probe"] if entry["probed"]]
        assert probed == [1, 2, 4], rank
        for entry in result["after_probe"]:
            assert entry["require_forward_param_sync"] and entry["model_training"], (rank, entry)
