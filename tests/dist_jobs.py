"""Multi-process jobs for the tests: ``torchrun --nproc_per_node 2`` of a script in tests/dist_scripts/ on CPU with
gloo, with a hard timeout, and what the tests check on their runs. Import as ``from dist_jobs import ...``
(tests/conftest.py puts tests/ on sys.path).

Each job's script writes ``result_rank<R>.json``; :func:`run_job` returns them, or fails the test with the job's logs.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPTS = os.path.join(HERE, "dist_scripts")
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(
    script: str, outdir: str, *args: str, dist_timeout: int = DIST_TIMEOUT_S, job_timeout: int = JOB_TIMEOUT_S
) -> dict[int, dict]:
    """Launch ``torchrun --nproc_per_node 2 script outdir *args``; return each rank's result, or fail with the logs.

    ``dist_timeout`` is the workers' process-group timeout (seconds); the elapsed time goes to the result as
    ``job_seconds``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.join(SCRIPTS, script), outdir, *args,
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
        command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=job_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: the group this test started
        output, _ = process.communicate()
        pytest.fail(f"{script} did not finish within {job_timeout} s (a hang?)\n{job_logs(outdir, output)}")
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        pytest.fail(f"{script} exited with {process.returncode} after {elapsed:.0f} s\n{job_logs(outdir, output)}")
    results = {}
    for rank in range(WORLD):
        path = os.path.join(outdir, f"result_rank{rank}.json")
        assert os.path.exists(path), f"{script}: rank {rank} wrote no result\n{job_logs(outdir, output)}"
        with open(path) as handle:
            results[rank] = json.load(handle)
        results[rank]["job_seconds"] = elapsed
    return results


def job_logs(outdir: str, output: str) -> str:
    parts = [f"--- output (tail) ---\n{output[-6000:]}"]
    for path in sorted(glob.glob(os.path.join(outdir, "error_rank*.txt"))):
        with open(path) as handle:
            parts.append(f"--- {os.path.basename(path)} ---\n{handle.read()[-4000:]}")
    return "\n".join(parts)


def jsonl_steps(logdir: str) -> list[int]:
    with open(os.path.join(logdir, "layerwatch.jsonl")) as handle:
        return [json.loads(line)["step"] for line in handle if line.strip()]


def assert_matches_reference(logdir: str, step: int, reference: dict[str, list]) -> None:
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
