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
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from models import FSDP2_ON_CPU

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDS_FSDP2_ON_CPU = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 (fully_shard) runs on a CPU from torch 2.6 on")
REPO = os.path.dirname(HERE)
SCRIPTS = os.path.join(os.path.dirname(HERE), "dist_scripts")
JOB_TIMEOUT_S = 420
# The workers' gloo timeout. Short, so that a hang fails in minutes, not the default 30; not 60 s, because on a
# loaded 2-core machine rank 0 closing its TensorBoard writer (waiting for the pictures) took 110 s while rank 1
# already waited in the next collective.
DIST_TIMEOUT_S = 180
WORLD = 2

NEEDS_GLOO = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
pytestmark = [pytest.mark.slow, NEEDS_GLOO]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_job(
    script: str, outdir: str, *args: str, dist_timeout: int = DIST_TIMEOUT_S, job_timeout: int = JOB_TIMEOUT_S
) -> dict[int, dict]:
    """Launch ``torchrun --nproc_per_node 2 script outdir *args``; return each rank's result, or fail with the logs.

    ``dist_timeout`` is the workers' process-group timeout (seconds); the elapsed time goes to the result as
    ``job_seconds``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), os.path.join(SCRIPTS, script), outdir, *args,
    ]
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        LAYERWATCH_DIST_TIMEOUT=str(dist_timeout),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p),
    )
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=job_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: the group this test started
        output, _ = process.communicate()
        pytest.fail(f"{script} did not finish within {job_timeout} s (a hang?)\n{_logs(outdir, output)}")
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        pytest.fail(f"{script} exited with {process.returncode} after {elapsed:.0f} s\n{_logs(outdir, output)}")
    results = {}
    for rank in range(WORLD):
        path = os.path.join(outdir, f"result_rank{rank}.json")
        assert os.path.exists(path), f"{script}: rank {rank} wrote no result\n{_logs(outdir, output)}"
        with open(path) as handle:
            results[rank] = json.load(handle)
        results[rank]["job_seconds"] = elapsed
    return results


def _logs(outdir: str, output: str) -> str:
    parts = [f"--- output (tail) ---\n{output[-6000:]}"]
    for path in sorted(glob.glob(os.path.join(outdir, "error_rank*.txt"))):
        with open(path) as handle:
            parts.append(f"--- {os.path.basename(path)} ---\n{handle.read()[-4000:]}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def accelerate_job(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("accelerate_ddp"))
    return outdir, _run_job("accelerate_ddp.py", outdir)


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("fsdp"))
    return outdir, _run_job("fsdp.py", outdir)


@pytest.fixture(scope="module")
def trainer_job(tmp_path_factory):
    pytest.importorskip("transformers")
    outdir = str(tmp_path_factory.mktemp("trainer_ddp"))
    return outdir, _run_job("trainer_ddp.py", outdir)


# ------------------------------------------------------------------------------------------------ helpers


def _jsonl_steps(logdir: str) -> list[int]:
    with open(os.path.join(logdir, "layerwatch.jsonl")) as handle:
        return [json.loads(line)["step"] for line in handle if line.strip()]


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
    recorded = _jsonl_steps(logdir)
    assert len(recorded) == len(set(recorded)), f"duplicate steps in the JSONL: {recorded}"
    assert recorded == steps


def _assert_matches_reference(logdir: str, step: int, reference: dict[str, list]) -> None:
    """The distributed record of ``step`` equals the single-process reference (within 1e-5)."""
    import layerwatch

    from layerwatch.metrics.registry import REFERENCE, REGISTRY

    run = layerwatch.read_run(logdir)
    row = list(run.steps).index(step)
    assert set(run.metrics) == set(reference), (sorted(run.metrics), sorted(reference))
    for name, expected in reference.items():
        if REFERENCE in REGISTRY[name].needs:  # compares with the run's earlier probes, which the reference lacks
            continue
        expected = np.array([np.nan if v is None else v for v in expected], dtype=float)
        got = run.metric(name)[row]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=name)
        assert np.isfinite(expected).any(), f"{name}: the reference is all NaN, the comparison proves nothing"


# ------------------------------------------------------------------------------------- Accelerate + DDP


def test_accelerate_ddp_writes_one_run_on_the_main_process(accelerate_job):
    outdir, results = accelerate_job
    # Probes at 0 (baseline), 1, 2 (failed on rank 1: skipped by both), 4.
    _assert_single_writer(outdir, results[0]["logdir"], [0, 1, 4])


def test_accelerate_ddp_metrics_equal_single_process(accelerate_job):
    _, results = accelerate_job
    _assert_matches_reference(results[0]["logdir"], 0, results[0]["reference"])


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
    steps = _jsonl_steps(logdir)
    assert steps == [0, 1, 2]
    _assert_matches_reference(logdir, 0, results[0]["reference"])
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
    _assert_matches_reference(logdir, 4, results[0]["reference"])  # DDP: final weights identical on all ranks


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
