"""The benchmark scripts run as they are: tiny smoke runs, and a clean exit without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_PROBE = os.path.join(REPO, "benchmarks", "gpu_probe.py")
pytestmark = pytest.mark.slow  # subprocesses running whole scripts


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, GPU_PROBE, *args], capture_output=True, text=True, env=env, timeout=600)


def test_gpu_probe_smoke_run_prints_one_row_per_model():
    result = run("--smoke")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| gpt2-small") or line.startswith("| llama-1b")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 10 and cells[3].endswith(" ms") and cells[9].endswith("%")
        assert float(cells[7].split()[0]) == 0  # no GPU memory is measured on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_gpu_probe_without_cuda_exits_cleanly_with_a_message():
    result = run()
    assert result.returncode == 0 and "no CUDA device" in result.stdout


def test_picture_cost_prints_its_table_with_the_training_thread_share():
    script = os.path.join(REPO, "benchmarks", "picture_cost.py")
    result = subprocess.run([sys.executable, script, "--layers", "3", "--history", "2", "--preset", "light"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = dict(line.strip("|").split("|")[:2] for line in result.stdout.splitlines() if line.startswith("| "))
    rows = {key.strip(): value.strip() for key, value in rows.items()}
    assert rows["pictures per probe (2 per metric)"].startswith("24 = ")  # "light": 12 per-layer metrics without labels
    for row in ("write() on the training thread, pictures drawn inline (before)",
                "write() on the training thread, pictures on the background thread", "close() waiting for the last pictures"):
        assert rows[row].endswith(" ms") and float(rows[row].split()[0]) >= 0


def test_overhead_prints_a_measured_and_a_predicted_slowdown_per_cell(tmp_path):
    script = os.path.join(REPO, "benchmarks", "overhead.py")
    saved = tmp_path / "cells.json"
    result = subprocess.run([sys.executable, script, "--quick", "--every", "10", "--layers", "2", "--prompts", "8",
                             "--threads", "1", "--save", str(saved)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["light"], ["standard"], ["paper"])]
    assert [(r[0], int(r[1])) for r in rows] == [(p, 10) for p in ("light", "standard", "paper")]
    for row in rows:
        probes, measured, predicted = int(row[3]), float(row[6].rstrip("%")), float(row[7].rstrip("%"))
        assert probes >= 2 and predicted > 0 and measured > -50  # probes at steps 10 and 20 cost something
        extra, model = float(row[10]), sum(float(x) for x in row[13:17])  # the model's parts add up to its prediction
        assert model / float(row[4]) == pytest.approx(predicted / 100, rel=0.02, abs=2e-4)
        assert extra == pytest.approx(float(row[5]) - float(row[4]), abs=0.02)
    assert "cost model within 30% of the measurement in" in result.stdout
    # --replay: the same cells beside the current model, without training
    replay = subprocess.run([sys.executable, script, "--replay", str(saved)], capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-3000:]
    replayed = [line.split() for line in replay.stdout.splitlines() if line.split()[:1] in (["light"], ["standard"], ["paper"])]
    assert [r[:10] for r in replayed] == [r[:10] for r in rows]


def test_findings_smoke_run_prints_every_finding():
    script = os.path.join(REPO, "benchmarks", "findings.py")
    result = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for finding in ("(a) ordering random > natural > repeated", "(b) sentiment probe peaks at layer", "(c) massive",
                    "(d) SE of natural prompt entropy"):
        assert f"SUMMARY {finding}" in result.stdout, finding
