"""One-rank faults and mismatched ranks, in real 2-process runs (torchrun, CPU, gloo; issue 18 points 1, 2, 11).

- rank_faults.py: under FSDP1, FSDP2 (torch >= 2.6) and DeepSpeed ZeRO-3 (when deepspeed is installed), layerwatch's
  own per-layer computation raises on rank 1 only, at layer 1, in the middle of the step-2 probe. Before the fix the
  exception left the hook and aborted rank 1's forward, leaving rank 0 in a parameter all-gather until the timeout.
  Then probes whose ranks disagree (prompt count, ids, a refusal on one rank) must fail alike on both ranks.
- one_rank_step.py: step() on rank 0 only must fail with a message stating the rule.
"""

from __future__ import annotations

import glob
import os

import pytest

from dist_jobs import NEEDS_GLOO, jsonl_steps, run_job

pytestmark = [pytest.mark.slow, NEEDS_GLOO]


@pytest.fixture(scope="module")
def faults_job(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("rank_faults"))
    return outdir, run_job("rank_faults.py", outdir)


def _flavours(results):
    flavours = [f for f in ("fsdp1", "fsdp2", "zero3") if f in results[0]]
    assert "fsdp1" in flavours
    return flavours


def test_hook_failure_on_one_rank_skips_the_probe_on_every_rank_and_training_goes_on(faults_job):
    outdir, results = faults_job
    assert results[0]["injected_fired"] == 0 and results[1]["injected_fired"] > 0, "the failure was not injected"
    for flavour in _flavours(results):
        for rank, result in results.items():
            info = result[flavour]
            assert info["outcomes"] == ["probed", "failed", "probed"], (flavour, rank)  # the next probe works
            assert info["error_count"] == 1, (flavour, rank)  # both ranks record the failed probe
            assert len(info["losses"]) == 3, (flavour, rank)  # training finished
        assert jsonl_steps(os.path.join(outdir, flavour)) == [1, 3], flavour  # never a half-reduced record


def test_failed_probe_is_counted_in_the_errors_scalar(faults_job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    outdir, _ = faults_job
    for flavour in ("fsdp1",):  # the one run with TensorBoard on (pictures cost time at close)
        events = glob.glob(os.path.join(outdir, flavour, "all_layers", "events.out.tfevents.*"))
        assert len(events) == 1, events
        accumulator = EventAccumulator(events[0])
        accumulator.Reload()
        errors = [(e.step, e.value) for e in accumulator.Scalars("layerwatch/errors")]
        assert dict(errors) == {1: 0.0, 2: 1.0, 3: 1.0}, (flavour, errors)  # the running count, at each probe


@pytest.mark.parametrize("case", ["prompt_count", "same_shape_other_ids", "refused_on_one_rank"])
def test_mismatched_ranks_fail_alike_before_the_forward(faults_job, case):
    _, results = faults_job
    for rank, result in results.items():
        got = result["mismatch"][case]
        assert got["raised"] == "RankMismatchError", (rank, got)
        expected = "refused the probe before the forward" if case == "refused_on_one_rank" else "different probes"
        assert expected in got["message"], (rank, got)
        assert result["mismatch"]["normal_probe_after"], rank  # the ranks are still in step
    assert "no.such.blocks" in results[1]["mismatch"]["refused_on_one_rank"]["message"]  # the refusing rank says why
    assert "rank(s) [1]" in results[0]["mismatch"]["refused_on_one_rank"]["message"]  # the others name it


def test_step_on_one_rank_only_explains_the_rule(tmp_path):
    results = run_job("one_rank_step.py", str(tmp_path), dist_timeout=5)
    assert results[0]["raised"] == "ProbeError", results[0]
    assert "every rank must call step() at the same steps" in results[0]["message"], results[0]
