"""Float32 products, eigenvalue-free collision entropy and the eigenvalue path chooser (issue 12).

Every value is checked against the independent float64 references of ``test_metrics`` (numpy, loops): float32
and bfloat16 hidden states to 1e-4 relative, float64 ones to 1e-6. The accelerator paths are exercised on the
CPU through their decision logic (device kind and timings injected); the CUDA tests at the end run where CUDA
exists.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tests.metrics.references import (
    make_tokens,
    make_views,
    ref_curvature,
    ref_dataset_entropy,
    ref_dime,
    ref_lidar,
    ref_mean_pool,
    ref_prompt_entropy,
    reference_input,
    to_torch,
)

from layerwatch import metrics
from layerwatch.metrics import base as metrics_base
from layerwatch.metrics import sets as metrics_sets
from layerwatch.metrics import dataset_entropy, dime, lidar, prompt_entropy, token_metrics

FLOAT32 = dict(rtol=1e-4, atol=1e-6)
FLOAT64 = dict(rtol=1e-6, atol=1e-8)


def close(actual: torch.Tensor, expected, tolerance) -> None:
    np.testing.assert_allclose(actual.to(torch.float64).numpy(), np.asarray(expected, dtype=np.float64), **tolerance)


def probe_like(dtype, side="right", seed=31, d=64):
    """Ragged prompts of up to 48 tokens (several Gram size groups), a common offset 30x the spread."""
    hidden_np, mask_np = make_tokens(layers=3, prompts=9, t=48, d=d, side=side, seed=seed)
    hidden_np = np.where(mask_np[None, :, :, None], hidden_np + 30.0 * np.random.default_rng(seed).normal(size=d), hidden_np)
    hidden = to_torch(np.clip(hidden_np, -1e30, 1e30), dtype)
    return hidden, torch.tensor(mask_np), reference_input(hidden), mask_np


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("side", ["right", "holes"])
def test_token_metrics_match_float64_reference_at_their_precision(dtype, side):
    hidden, mask, seen, mask_np = probe_like(dtype, side)
    tolerance = FLOAT64 if dtype == torch.float64 else FLOAT32
    assert metrics_base._working_dtype(hidden) == (torch.float64 if dtype == torch.float64 else torch.float32)
    fused = token_metrics(hidden, mask)
    assert all(v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for v in fused.values())
    close(fused["prompt_entropy"], ref_prompt_entropy(seen, mask_np), tolerance)
    close(fused["curvature"], ref_curvature(seen, mask_np), tolerance)
    close(fused["curvature_abs"], ref_curvature(seen, mask_np, absolute=True), tolerance)
    close(fused["mean_pool"], ref_mean_pool(seen, mask_np), tolerance)
    for alpha in (0.5, 2.0):
        close(prompt_entropy(hidden, mask, alpha=alpha), ref_prompt_entropy(seen, mask_np, alpha), tolerance)
    # D x D covariance path (prompts longer than D = 8), curvature alone (no Gram matrices)
    close(prompt_entropy(hidden[..., :8], mask), ref_prompt_entropy(seen[..., :8], mask_np), tolerance)
    close(metrics.curvature(hidden, mask), ref_curvature(seen, mask_np), tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mean_pool_of_full_length_prompts(dtype):
    """Every token real (mask None or all True): one reduction over the input, same values as the block path."""
    hidden = to_torch(np.random.default_rng(4).normal(size=(2, 5, 9, 16)) + 40.0, dtype)
    expected = ref_mean_pool(reference_input(hidden), np.ones((5, 9), dtype=bool))
    tolerance = FLOAT64 if dtype == torch.float64 else FLOAT32
    for mask in (None, torch.ones(5, 9, dtype=torch.long)):
        pooled = metrics.mean_pool(hidden, mask)
        assert pooled.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        close(pooled, expected, tolerance)
    ragged = torch.ones(5, 9, dtype=torch.bool)
    ragged[0, -1] = False  # one padded slot: the block path
    close(metrics.mean_pool(hidden, ragged)[:, 1:], expected[:, 1:], tolerance)


def test_float32_centering_survives_a_large_common_offset():
    """Mean 10^6 times the spread: a one-pass float32 mean would be off by up to 0.03 of the spread in every
    row (entropies off by 0.1 relative); the corrected two-pass centering keeps them within 1e-6."""
    hidden_np, mask_np = make_tokens(layers=2, prompts=6, t=40, d=32, side="left", seed=8)
    offset = 1e6 * np.random.default_rng(2).normal(size=(2, 1, 1, 32))
    hidden = to_torch(np.where(mask_np[None, :, :, None], hidden_np + offset, 0.0), torch.float32)
    seen, mask = reference_input(hidden), torch.tensor(mask_np)
    fused = token_metrics(hidden, mask)
    close(fused["prompt_entropy"], ref_prompt_entropy(seen, mask_np), FLOAT32)
    close(fused["curvature"], ref_curvature(seen, mask_np), FLOAT32)
    close(fused["mean_pool"], ref_mean_pool(seen, mask_np), dict(rtol=1e-6, atol=0))


def test_collision_entropy_takes_no_eigenvalues(monkeypatch):
    """alpha = 2 from the Frobenius norm of the trace-normalized Gram, for every metric with an entropy."""

    def no_eigenvalues(*args, **kwargs):
        raise AssertionError("eigenvalues computed for alpha = 2")

    monkeypatch.setattr(metrics_base, "_eigvalsh", no_eigenvalues)
    for dtype, tolerance in ((torch.float32, FLOAT32), (torch.float64, FLOAT64)):
        hidden, mask, seen, mask_np = probe_like(dtype, "holes", seed=5)
        for normalized in (True, False):
            expected = ref_prompt_entropy(seen, mask_np, 2.0, normalized)
            close(token_metrics(hidden, mask, alpha=2.0, normalized=normalized)["prompt_entropy"], expected, tolerance)
        close(prompt_entropy(hidden[..., :8], mask, alpha=2.0), ref_prompt_entropy(seen[..., :8], mask_np, 2.0), tolerance)
    views = torch.tensor(make_views(layers=2, m=12, q=3, d=20, seed=6))
    pooled, other = views[..., 0, :], views[..., 1, :]
    close(dataset_entropy(pooled, alpha=2.0), [ref_dataset_entropy(p, 2.0) for p in pooled.numpy()], FLOAT64)
    close(lidar(views, alpha=2.0), [ref_lidar(v, 2.0) for v in views.numpy()], FLOAT64)
    perms = metrics_sets._dime_permutations(12, 4, torch.Generator().manual_seed(1)).numpy()
    got = dime(pooled, other, alpha=2.0, n_permutations=4, generator=torch.Generator().manual_seed(1))
    close(got, [ref_dime(a, b, perms, 2.0) for a, b in zip(pooled.numpy(), other.numpy())], FLOAT64)
    # undefined cases stay NaN: a single token, identical tokens, a non-finite value
    flat = torch.ones(1, 2, 4, 3)
    flat[0, 1, 2, 0] = float("nan")
    assert torch.isnan(prompt_entropy(flat, alpha=2.0)).all()


def random_psd(count: int, n: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(count, n, n + 3, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return x @ x.mT


def test_eigenvalue_path_rule_and_measurement_once_per_size_dtype_device(caplog):
    calls = []

    def timer(path, sample):
        calls.append((path, tuple(sample.shape)))
        return {"device": 2.0, "cpu": 0.5}[path]  # a torch whose solver loops over matrices on the GPU

    paths = metrics.EigenvaluePaths(timer=timer)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.DEBUG, logger="layerwatch.metrics"):
        assert paths.choose(random_psd(40, 32), cuda) == "device"  # n <= 32: batched solver, no measurement
        assert calls == []
        big = random_psd(40, 64)
        assert paths.choose(big, cuda) == "cpu" and paths.choose(big[:3], cuda) == "cpu"
        assert calls == [("device", (16, 64, 64)), ("cpu", (16, 64, 64))]  # measured once, on a 16-matrix sample
        assert paths.choose(big.float(), cuda) == "cpu" and len(calls) == 4  # another dtype: measured again
        assert paths.choose(big, torch.device("cuda", 1)) == "cpu" and len(calls) == 6  # another device
        assert paths.choose(big) == "cpu" and len(calls) == 6  # CPU tensors: never measured
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "64 x 64" in r.getMessage()]
    assert len(messages) == 3 and all("cpu path" in m and "device 2000.00 ms" in m for m in messages)
    assert (64, torch.float64, "cuda") in paths.choices
    batched = metrics.EigenvaluePaths(timer=lambda path, sample: {"device": 0.001, "cpu": 0.5}[path])
    assert batched.choose(big, cuda) == "device"  # a torch that batches the solver keeps the stack on the GPU


def test_eigenvalue_paths_give_the_same_spectra():
    stacks = [random_psd(5, 40, seed=1), random_psd(3, 12, seed=2).reshape(1, 3, 12, 12)]
    expected = [np.linalg.eigvalsh(s.numpy()) for s in stacks]
    for path in ("device", "cpu"):
        for values, want in zip(metrics_base._eigvalsh_by_path(stacks, [path, path]), expected):
            np.testing.assert_allclose(values.numpy(), want, rtol=1e-10, atol=1e-10)
    mixed = metrics_base._eigvalsh_by_path(stacks, ["cpu", "device"])
    np.testing.assert_allclose(mixed[0].numpy(), expected[0], rtol=1e-10, atol=1e-10)
    # the real measurement (both paths run here on the CPU) picks one of them and remembers it
    paths = metrics.EigenvaluePaths()
    assert paths.choose(stacks[0], torch.device("cuda")) in {"device", "cpu"}
    assert list(paths.choices) == [(40, torch.float64, "cuda")]
    assert metrics_base._time_eigenvalue_path("cpu", stacks[0]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_eigenvalue_paths_and_bfloat16_states():
    for dtype in (torch.float32, torch.float64):
        stack = random_psd(24, 64, dtype=dtype, seed=3).cuda()
        want = np.linalg.eigvalsh(stack.cpu().double().numpy())
        for path in ("device", "cpu"):
            values = metrics_base._eigvalsh_by_path([stack], [path])[0]
            assert values.is_cuda
            np.testing.assert_allclose(values.cpu().double().numpy(), want, rtol=1e-4, atol=1e-3)
        assert metrics_base._EIGENVALUE_PATHS.choose(stack) in {"device", "cpu"}
        assert (64, dtype, str(stack.device)) in metrics_base._EIGENVALUE_PATHS.choices
    hidden, mask, seen, mask_np = probe_like(torch.bfloat16, "right", seed=9)
    fused = token_metrics(hidden.cuda(), mask.cuda())
    assert all(v.is_cuda for v in fused.values())
    close(fused["prompt_entropy"].cpu(), ref_prompt_entropy(seen, mask_np), FLOAT32)
    close(fused["curvature"].cpu(), ref_curvature(seen, mask_np), FLOAT32)
