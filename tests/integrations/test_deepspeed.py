"""Real DeepSpeed ZeRO-2/3 on CPU: 2 ranks over gloo (torchrun), through the HF Trainer (``deepspeed=``) and
Accelerate (``DeepSpeedPlugin``); see tests/dist_scripts/deepspeed_jobs.py and ../shared/research/deepspeed-cpu.md.

Each job asserts: losses bit-identical with and without layerwatch (every micro-batch, every rank); the metrics of
the last probe equal to a one-process probe of the saved final weights (fp32, 1e-5); after a probe, no more
parameters stay gathered than DeepSpeed's own eval forward leaves. Skipped when deepspeed is not importable.
"""

from __future__ import annotations

import pytest

from dist_jobs import NEEDS_GLOO, assert_matches_reference, jsonl_steps, run_job

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")

pytestmark = [pytest.mark.slow, NEEDS_GLOO]

PROBED = [1, 2, 4]  # every=2, log-spaced start, and the last step (4)


@pytest.mark.parametrize("job", ["trainer_zero2", "trainer_zero3", "accelerate_zero3"])
def test_deepspeed(tmp_path, job):
    results = run_job("deepspeed_jobs.py", str(tmp_path), job)
    engine = results[0]["engine"]
    assert engine == "DeepSpeedEngine", engine
    for rank, result in results.items():
        assert len(result["losses_plain"]) == 8, rank  # 4 optimizer steps x 2 accumulation micro-batches
        assert result["losses_watch"] == result["losses_plain"], f"rank {rank}: losses moved"
        assert [entry["step"] for entry in result["after_probe"]] == PROBED, rank
        leaves = result["eval_forward_leaves"]
        for entry in result["after_probe"]:
            assert entry["gathered"] <= leaves, (rank, entry, leaves)
    assert jsonl_steps(results[0]["logdir"]) == PROBED
    assert_matches_reference(results[0]["logdir"], PROBED[-1], results[0]["reference"])
