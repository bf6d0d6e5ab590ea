"""intrinsic_dimension (SPEC §8): the TwoNN estimate against a brute-force numpy/scipy computation, and analytic
cases (points on a k-dimensional subspace, normalized onto the (k-1)-sphere in it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from layerwatch.metrics import intrinsic_dimension, registry


def brute_twonn(pooled: np.ndarray) -> float:
    """Centre, L2-normalise, all pairwise distances, the two nearest, drop r1 = 0, n / sum ln(r2 / r1)."""
    z = pooled - pooled.mean(0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    distances = cdist(z, z)
    np.fill_diagonal(distances, np.inf)
    two = np.sort(distances, axis=1)[:, :2]
    kept = two[:, 0] > 0
    return kept.sum() / np.log(two[kept, 1] / two[kept, 0]).sum()


def test_matches_a_brute_force_computation_per_layer_with_duplicates_dropped():
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(3, 60, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    pooled[1, 10] = pooled[1, 11]  # a duplicated prompt: both have r1 = 0 and are dropped
    pooled[2, 5:8] = pooled[2, 4]  # four copies
    got = intrinsic_dimension(pooled)
    for layer in range(3):
        assert float(got[layer]) == pytest.approx(brute_twonn(pooled[layer].numpy()), rel=1e-10)
    assert float(got[1]) != pytest.approx(brute_twonn(np.delete(pooled[1].numpy(), 10, axis=0)), rel=1e-6)
    as_float32 = intrinsic_dimension(pooled.float())
    assert as_float32.dtype == torch.float32
    torch.testing.assert_close(as_float32, got.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_points_on_a_k_dimensional_subspace_give_about_k_minus_1(k):
    g = torch.Generator().manual_seed(k)
    pooled = torch.randn(2000, k, generator=g, dtype=torch.float64) @ torch.randn(k, 64, generator=g, dtype=torch.float64)
    pooled = pooled + torch.randn(64, generator=g, dtype=torch.float64)  # an offset: centering removes it
    estimate = float(intrinsic_dimension(pooled))
    assert estimate == pytest.approx(k - 1, rel=0.15)  # the unit sphere inside the subspace
    assert estimate == pytest.approx(brute_twonn(pooled.numpy()), rel=1e-9)


def test_undefined_cases_are_nan():
    assert math.isnan(float(intrinsic_dimension(torch.randn(2, 5))))  # fewer than 3 rows
    bad = torch.randn(2, 10, 4)
    bad[1, 3, 0] = math.inf
    got = intrinsic_dimension(bad)
    assert math.isfinite(float(got[0])) and math.isnan(float(got[1]))  # a non-finite value poisons its layer only
    same = torch.ones(6, 3)
    assert math.isnan(float(intrinsic_dimension(same)))  # all one point: every r1 = 0
    with pytest.raises(ValueError):
        intrinsic_dimension(torch.randn(5))


def test_registered_in_the_standard_and_paper_presets():
    assert "intrinsic_dimension" in registry.preset("standard") and "intrinsic_dimension" in registry.preset("paper")
    assert "intrinsic_dimension" not in registry.preset("light")
