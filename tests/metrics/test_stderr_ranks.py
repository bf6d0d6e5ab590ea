"""The standard errors under torchrun (2 ranks, gloo): the main rank's equal a single process's exactly (per-prompt
ones come from the all-reduced per-prompt buffers, set-level ones from the reduced buffers on the main rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from dist_jobs import NEEDS_GLOO, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "stderr_worker.py")

pytestmark = [pytest.mark.slow, NEEDS_GLOO]


def test_two_ranks_give_the_single_process_standard_errors(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, WORKER, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, str(tmp_path)]
    ranks = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stdout[-3000:] + ranks.stderr[-3000:]
    read = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    one, main, other = read("stderr_world1_rank0.json"), read("stderr_world2_rank0.json"), read("stderr_world2_rank1.json")
    assert set(one) == set(main) and {"dataset_entropy", "dime", "probe_accuracy", "prompt_entropy"} <= set(one)
    for name, values in one.items():
        np.testing.assert_array_equal(np.array(main[name], float), np.array(values, float), err_msg=name)
    # the other rank skips the jackknife (its record is never written); its per-prompt standard errors agree
    assert "dataset_entropy" not in other
    np.testing.assert_array_equal(other["prompt_entropy"], one["prompt_entropy"])
