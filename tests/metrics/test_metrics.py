"""Tests of layerwatch.metrics against independent float64 references (``tests/metrics/references.py``: numpy, plain
Python loops, scipy.stats), analytic cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerwatch.metrics import base as metrics_base
from layerwatch.metrics import sets as metrics_sets
from layerwatch.metrics import tokens as metrics_tokens
from layerwatch.metrics import (
    bimodality,
    curvature,
    dataset_entropy,
    dime,
    effective_rank,
    infonce,
    lidar,
    mean_pool,
    normalize,
    prompt_entropy,
    token_metrics,
)

from tests.metrics.references import (
    FLOAT32_RTOL,
    FLOAT32_ATOL,
    PROMPT_METRICS,
    ref_normalize,
    ref_prompt_entropy,
    ref_curvature,
    ref_mean_pool,
    ref_dataset_entropy,
    ref_effective_rank,
    ref_infonce,
    ref_lidar,
    ref_dime,
    ref_bimodality,
    make_tokens,
    to_torch,
    reference_input,
    assert_close,
    make_views,
)


# ----------------------------------------------------------------------------------------------------
# agreement with the references
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", ["right", "left", "holes"])
@pytest.mark.parametrize("d", [16, 6])  # T <= D (Gram path) and T > D (covariance path)
def test_token_level_matches_reference(dtype, side, d):
    hidden_np, mask_np = make_tokens(d=d, side=side, seed=d)
    hidden, mask = to_torch(hidden_np, dtype), torch.tensor(mask_np)
    seen = reference_input(hidden)
    expected_entropy = ref_prompt_entropy(seen, mask_np)
    expected_curv = ref_curvature(seen, mask_np)
    expected_abs = ref_curvature(seen, mask_np, absolute=True)

    entropy = prompt_entropy(hidden, mask)
    assert entropy.dtype == dtype and entropy.shape == (2, 7)
    assert_close(entropy, expected_entropy)
    assert_close(curvature(hidden, mask), expected_curv)
    assert_close(curvature(hidden, mask, absolute=True), expected_abs)
    assert_close(prompt_entropy(hidden, mask, normalized=False), ref_prompt_entropy(seen, mask_np, normalized=False))

    fused = token_metrics(hidden, mask)
    assert set(fused) == {"prompt_entropy", "curvature", "curvature_abs", "mean_pool"}
    assert all(v.dtype == dtype and v.shape[:2] == (2, 7) for v in fused.values())
    assert_close(fused["mean_pool"], ref_mean_pool(seen, mask_np))
    assert_close(fused["prompt_entropy"], expected_entropy)
    assert_close(fused["curvature"], expected_curv)
    assert_close(fused["curvature_abs"], expected_abs)
    # edge prompts: N = 1 (both NaN), N = 2 (entropy 0, curvature NaN)
    assert torch.isnan(fused["prompt_entropy"][:, 0]).all() and torch.isnan(fused["curvature"][:, :2]).all()
    assert torch.isfinite(fused["prompt_entropy"][:, 1:]).all() and torch.isfinite(fused["curvature"][:, 2:]).all()


@pytest.mark.parametrize("block_bytes", [1, 5000])  # one prompt per block; a few prompts per block
@pytest.mark.parametrize("side", ["right", "left", "holes"])
@pytest.mark.parametrize("copy_runs", [0, 4])  # rows gathered by index_select; copied from strided views
def test_many_blocks_match_reference(monkeypatch, block_bytes, side, copy_runs):
    """The block loop (prompts sorted by length, cropped, compacted, grouped by Gram size, results unsorted)."""
    monkeypatch.setattr(metrics_base, "_CPU_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(metrics_base, "_MAX_COPY_RUNS", copy_runs)
    monkeypatch.setattr(metrics_tokens, "_GRAM_SIZE_STEP", 3)  # lengths 1..10: Gram groups of size 3, 6, 9 and 10
    hidden_np, mask_np = make_tokens(layers=3, prompts=9, t=10, d=12, side=side, seed=21)
    hidden, mask = to_torch(hidden_np, torch.float32), torch.tensor(mask_np)
    seen = reference_input(hidden)
    fused = token_metrics(hidden, mask)
    assert_close(fused["prompt_entropy"], ref_prompt_entropy(seen, mask_np))
    assert_close(fused["curvature"], ref_curvature(seen, mask_np))
    assert_close(curvature(hidden, mask, absolute=True), ref_curvature(seen, mask_np, absolute=True))
    assert_close(prompt_entropy(hidden[..., :4], mask), ref_prompt_entropy(seen[..., :4], mask_np))  # D x D path
    assert_close(mean_pool(hidden, mask), ref_mean_pool(seen, mask_np))
    dense = torch.randn(3, 9, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    all_real = np.ones((9, 10), dtype=bool)  # mask None: blocks are slices of the input, no copy
    assert_close(curvature(dense), ref_curvature(dense.numpy(), all_real))
    assert_close(prompt_entropy(dense), ref_prompt_entropy(dense.numpy(), all_real))


def test_threaded_blocks_match_serial_and_restore_the_thread_count(monkeypatch):
    """With 2 threads, Gram blocks and eigenvalues are spread over Python threads: same results, same setting."""
    monkeypatch.setattr(metrics_base, "_CPU_BLOCK_BYTES", 5000)
    hidden_np, mask_np = make_tokens(layers=4, prompts=9, t=30, d=40, side="right", seed=22)
    hidden, mask = to_torch(hidden_np, torch.float32), torch.tensor(mask_np)
    serial = token_metrics(hidden, mask)  # conftest runs torch with 1 thread: nothing is spread
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = token_metrics(hidden, mask)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for key in serial:
        torch.testing.assert_close(threaded[key], serial[key], rtol=1e-6, atol=1e-8, equal_nan=True, msg=key)
    assert_close(threaded["prompt_entropy"], ref_prompt_entropy(reference_input(hidden), mask_np))


def test_large_common_offset_is_centered_accurately():
    """Hidden states with a mean 10^4 times their spread (massive activations) in float32."""
    hidden_np, mask_np = make_tokens(layers=2, t=12, d=16, side="left", seed=3)
    offset = 1e4 * np.random.default_rng(1).normal(size=(2, 1, 1, 16))
    hidden = to_torch(np.where(mask_np[None, :, :, None], hidden_np + offset, hidden_np), torch.float32)
    mask, seen = torch.tensor(mask_np), reference_input(hidden)
    values = token_metrics(hidden, mask)
    assert_close(values["prompt_entropy"], ref_prompt_entropy(seen, mask_np))
    assert_close(values["curvature"], ref_curvature(seen, mask_np))
    assert_close(curvature(hidden, mask), ref_curvature(seen, mask_np))
    pooled = mean_pool(hidden, mask)[:, 1:]
    assert_close(dataset_entropy(pooled), [ref_dataset_entropy(p) for p in reference_input(pooled)])


@pytest.mark.parametrize("alpha", [0.5, 2.0, 3.0])
def test_prompt_entropy_alpha_matches_reference(alpha):
    hidden_np, mask_np = make_tokens(side="left", seed=3, rank=4)
    hidden = to_torch(hidden_np, torch.float32)
    seen = reference_input(hidden)
    assert_close(prompt_entropy(hidden, torch.tensor(mask_np), alpha=alpha), ref_prompt_entropy(seen, mask_np, alpha))
    assert_close(
        token_metrics(hidden, torch.tensor(mask_np), alpha=alpha, normalized=False)["prompt_entropy"],
        ref_prompt_entropy(seen, mask_np, alpha, normalized=False),
    )


def test_mask_forms_and_shapes():
    hidden_np, mask_np = make_tokens(layers=1, side="right", seed=5)
    hidden = to_torch(hidden_np, torch.float64)
    mask = torch.tensor(mask_np)
    expected = prompt_entropy(hidden, mask)

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    same(prompt_entropy(hidden, mask.long()), expected)  # 0/1 mask
    same(prompt_entropy(hidden, mask.expand(1, *mask.shape)), expected)  # full-shape mask
    same(prompt_entropy(hidden[0], mask), expected[0])  # no leading dims
    stacked = hidden.expand(3, 2, *hidden.shape[1:])  # two leading dims
    assert prompt_entropy(stacked, mask).shape == (3, 2, 7)
    # mask None = all tokens real
    full = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(curvature(full), curvature(full, torch.ones(3, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="mask"):
        prompt_entropy(hidden, mask[:, :-1])
    with pytest.raises(ValueError, match="hidden"):
        prompt_entropy(hidden[0, 0], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_pool_and_normalize_match_reference(dtype):
    hidden_np, mask_np = make_tokens(side="holes", seed=7)
    hidden, mask = to_torch(hidden_np, dtype), torch.tensor(mask_np)
    pooled = mean_pool(hidden, mask)
    assert pooled.dtype == dtype and pooled.shape == (2, 7, 16)
    assert_close(pooled, ref_mean_pool(reference_input(hidden), mask_np))

    z = normalize(hidden, mask)
    assert z.dtype == dtype and z.shape == hidden.shape
    seen = reference_input(hidden)
    for layer in range(2):
        for prompt in range(7):
            valid = mask_np[prompt]
            assert_close(z[layer, prompt][torch.tensor(valid)], ref_normalize(seen[layer, prompt][valid]))
            assert torch.all(z[layer, prompt][torch.tensor(~valid)] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,d", [(10, 24), (30, 8)])  # M x M Gram and D x D covariance
def test_set_level_matches_reference(dtype, m, d):
    rng = np.random.default_rng(m + d)
    pooled = to_torch(rng.normal(size=(3, m, d)) + rng.normal(size=(3, 1, d)) * 4, dtype)
    seen = reference_input(pooled)
    for alpha in (1.0, 2.0):
        for norm in (True, False):
            values = dataset_entropy(pooled, alpha=alpha, normalized=norm)
            assert values.dtype == dtype and values.shape == (3,)
            assert_close(values, [ref_dataset_entropy(x, alpha, norm) for x in seen])
    assert_close(effective_rank(pooled), [ref_effective_rank(x) for x in seen])

    other = to_torch(seen + 0.5 * rng.normal(size=seen.shape), dtype)
    seen_other = reference_input(other)
    for tau in (0.1, 0.5):
        assert_close(infonce(pooled, other, temperature=tau), [ref_infonce(a, b, tau) for a, b in zip(seen, seen_other)])

    perms = metrics_sets._dime_permutations(m, 5, torch.Generator().manual_seed(3)).numpy()
    for alpha in (1.0, 2.0):
        got = dime(pooled, other, alpha=alpha, n_permutations=5, generator=torch.Generator().manual_seed(3))
        assert got.dtype == dtype
        assert_close(got, [ref_dime(a, b, perms, alpha) for a, b in zip(seen, seen_other)], atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,q,d", [(6, 3, 40), (12, 4, 10), (20, 2, 30)])  # M·Q < D, M·Q > D > M, D < M·Q
def test_lidar_matches_reference(dtype, m, q, d):
    views = to_torch(make_views(m=m, q=q, d=d, seed=m * q), dtype)
    seen = reference_input(views)
    for alpha in (1.0, 2.0):
        got = lidar(views, alpha=alpha)
        assert got.dtype == dtype and got.shape == (2,)
        assert_close(got, [ref_lidar(v, alpha) for v in seen])
    assert_close(lidar(views, delta=1e-2), [ref_lidar(v, 1.0, 1e-2) for v in seen])


@pytest.mark.parametrize("m,q,d", [(6, 3, 40), (12, 4, 10), (20, 2, 30), (5, 1, 8)])
def test_lidar_woodbury_and_direct_paths_agree(m, q, d):
    views = torch.tensor(make_views(m=m, q=q, d=d, seed=1), dtype=torch.float64)
    z, _ = metrics_base._center_unit(views.reshape(2, m * q, d), None)
    z = z.reshape(2, m, q, d)
    spectra = [
        metrics_base._entropy_from_eigenvalues(metrics_base._safe_eigvalsh(metrics_sets._lidar_kernel(z, 1e-4, method)), 1.0)
        for method in ("woodbury", "direct")
    ]
    torch.testing.assert_close(spectra[0], spectra[1], rtol=1e-9, atol=1e-12)
    assert_close(spectra[0], [ref_lidar(v) for v in views.numpy()])


def test_bimodality_matches_scipy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 30)) ** 3
    values[1, :5] = np.nan
    values[2, ::2] = np.inf
    values[3, 3:] = np.nan  # 3 finite values: NaN
    for dtype in (torch.float32, torch.float64):
        tensor = to_torch(values, dtype)
        got = bimodality(tensor)
        assert got.dtype == dtype and got.shape == (4,)
        assert_close(got, [ref_bimodality(v) for v in reference_input(tensor)])
        assert_close(bimodality(tensor.T, dim=0), got.to(torch.float64).numpy(), rtol=1e-12)
    assert torch.isnan(bimodality(torch.ones(10)))  # no spread
    assert torch.isnan(bimodality(torch.tensor([1.0, 2.0, 3.0])))


# ----------------------------------------------------------------------------------------------------
# analytic and property checks
# ----------------------------------------------------------------------------------------------------


def rotated_pairs(r: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows ±u_1, ..., ±u_r for orthonormal u_i: centering keeps them, unit norm, rank r."""
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    u = q[:, :r].T
    return torch.cat([u, -u])[torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("r", [1, 3, 7])
def test_orthogonal_equal_norm_rows_give_ln_r(r):
    rows = rotated_pairs(r, 10) * 5.0
    expected = math.log(r)
    assert prompt_entropy(rows[None], normalized=False).item() == pytest.approx(expected, abs=1e-12)
    assert dataset_entropy(rows, normalized=False).item() == pytest.approx(expected, abs=1e-12)
    # on rows that are already orthonormal (no centering): the entropy helper itself
    eigen = metrics_base._gram_eigenvalues(torch.eye(r, 10, dtype=torch.float64))
    assert metrics_base._entropy_from_eigenvalues(eigen, 1.0).item() == pytest.approx(expected, abs=1e-12)
    for alpha in (0.5, 2.0):  # a flat spectrum has S_alpha = ln r for every alpha
        assert dataset_entropy(rows, alpha=alpha, normalized=False).item() == pytest.approx(expected, abs=1e-12)


def test_rank_r_bounds_entropy():
    for r in (2, 4):
        hidden_np, mask_np = make_tokens(layers=1, t=20, d=16, seed=r, rank=r)
        values = prompt_entropy(torch.tensor(hidden_np), torch.tensor(mask_np), normalized=False)
        finite = values[torch.isfinite(values)]
        assert len(finite) >= 5 and (finite <= math.log(r) + 1e-12).all()
        pooled = torch.randn(30, r, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) @ torch.randn(
            r, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
        )
        assert dataset_entropy(pooled, normalized=False).item() <= math.log(r) + 1e-12


def test_gram_and_covariance_paths_agree():
    gen = torch.Generator().manual_seed(0)
    for n, d in ((12, 30), (30, 12)):
        z, _ = metrics_base._center_unit(torch.randn(3, n, d, dtype=torch.float64, generator=gen), None)
        for alpha in (1.0, 0.999, 2.0):
            rows = metrics_base._entropy_from_eigenvalues(metrics_base._gram_eigenvalues(z, "rows"), alpha)
            cols = metrics_base._entropy_from_eigenvalues(metrics_base._gram_eigenvalues(z, "columns"), alpha)
            torch.testing.assert_close(rows, cols, rtol=1e-10, atol=1e-12)
    # public API: padding the same prompts beyond D switches prompt entropy to the D x D path
    hidden_np, mask_np = make_tokens(layers=2, t=8, d=10, seed=11)
    hidden, mask = torch.tensor(hidden_np), torch.tensor(mask_np)
    wide = torch.cat([hidden, torch.full((2, 7, 9, 10), float("nan"), dtype=torch.float64)], dim=2)
    wide_mask = torch.cat([mask, torch.zeros(7, 9, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(prompt_entropy(wide, wide_mask), prompt_entropy(hidden, mask), rtol=1e-10, atol=1e-12, equal_nan=True)


def test_alpha_near_one_is_continuous():
    hidden_np, mask_np = make_tokens(seed=2, rank=5)
    hidden, mask = torch.tensor(hidden_np), torch.tensor(mask_np)
    one, near = prompt_entropy(hidden, mask), prompt_entropy(hidden, mask, alpha=0.999)
    torch.testing.assert_close(near, one, rtol=0, atol=1e-2, equal_nan=True)
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(dataset_entropy(pooled, alpha=0.999), dataset_entropy(pooled), rtol=0, atol=1e-2)


def test_exp_entropy_at_most_effective_rank():
    gen = torch.Generator().manual_seed(4)
    for m, d in ((20, 8), (10, 40), (50, 50)):
        pooled = torch.randn(4, m, d, generator=gen) * torch.logspace(0, -2, d)
        assert (torch.exp(dataset_entropy(pooled, normalized=False)) <= effective_rank(pooled) * (1 + 1e-6)).all()


def test_gaussian_tokens_curvature():
    hidden = torch.randn(8, 64, 512, generator=torch.Generator().manual_seed(0))
    values = token_metrics(hidden)
    assert values["curvature"].mean().item() == pytest.approx(2 * math.pi / 3, abs=0.02)
    assert values["curvature_abs"].mean().item() == pytest.approx(math.pi / 3, abs=0.02)


def test_invariance_metrics_identical_vs_shuffled_views():
    m = 32
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, m, 8, generator=gen)
    shuffled = a[:, torch.randperm(m, generator=gen)]
    assert (infonce(a, a) < 0.2 * math.log(m)).all()
    assert (infonce(a, shuffled) > 0.9 * math.log(m)).all()
    same = dime(a, a, n_permutations=20)
    other = dime(a, shuffled, n_permutations=20)
    assert (same > 0.1).all()
    assert (other.abs() < 0.1 * same).all()


def test_bimodality_two_clusters_vs_normal():
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(400, generator=gen)
    clusters = torch.cat([torch.randn(200, generator=gen) * 0.3 - 2, torch.randn(200, generator=gen) * 0.3 + 2])
    assert bimodality(clusters).item() > 5 / 9
    assert bimodality(normal).item() < 5 / 9


def test_permuting_prompts_leaves_set_metrics_unchanged():
    gen = torch.Generator().manual_seed(2)
    views = torch.tensor(make_views(m=16, q=2, d=24, seed=5))
    perm = torch.randperm(16, generator=gen)
    a, b = views[..., 0, :], views[..., 1, :]
    pa, pb = a[:, perm], b[:, perm]
    for fn in (dataset_entropy, effective_rank):
        torch.testing.assert_close(fn(pa), fn(a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(infonce(pa, pb), infonce(a, b), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lidar(views[:, perm]), lidar(views), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bimodality(a[..., 0][:, perm]), bimodality(a[..., 0]), rtol=1e-10, atol=1e-12)
    # DiME's true-pairing term is invariant exactly; the permutation average only in expectation
    permuted = dime(pa, pb, n_permutations=200)
    original = dime(a, b, n_permutations=200)
    torch.testing.assert_close(permuted, original, rtol=0, atol=0.05 * original.abs().max().item())


def test_extra_padding_leaves_token_metrics_unchanged():
    hidden_np, mask_np = make_tokens(layers=2, t=10, d=12, side="left", seed=8)
    hidden, mask = torch.tensor(hidden_np), torch.tensor(mask_np)
    base = token_metrics(hidden, mask)
    for pad in (3, 7):  # 13 <= D (Gram path) and 17 > D (covariance path)
        left = torch.full((2, 7, pad, 12), float("nan"), dtype=torch.float64)
        right = torch.full((2, 7, pad, 12), 1e30, dtype=torch.float64)
        wide = torch.cat([left, hidden, right], dim=2)
        wide_mask = torch.cat([torch.zeros(7, pad, dtype=torch.bool), mask, torch.zeros(7, pad, dtype=torch.bool)], 1)
        padded = token_metrics(wide, wide_mask)
        for key in base:
            torch.testing.assert_close(padded[key], base[key], rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(mean_pool(wide, wide_mask), mean_pool(hidden, mask), rtol=1e-12, atol=1e-12, equal_nan=True)


def test_scaling_leaves_every_metric_unchanged():
    hidden_np, mask_np = make_tokens(layers=2, t=10, d=12, side="right", seed=9)
    hidden, mask = torch.tensor(hidden_np), torch.tensor(mask_np)
    views = torch.tensor(make_views(m=10, q=3, d=12, seed=2))

    def everything(scale):
        h = torch.where(mask[..., None], hidden * scale, hidden)  # scale the real tokens only
        v = views * scale
        out = dict(token_metrics(h, mask))
        out["mean_pool"] = out["mean_pool"] / scale  # the one value that scales (linearly)
        out["pooled_entropy"] = dataset_entropy(mean_pool(h, mask)[:, 3:])
        out["effective_rank"] = effective_rank(v[..., 0, :])
        out["infonce"] = infonce(v[..., 0, :], v[..., 1, :])
        out["lidar"] = lidar(v)
        out["dime"] = dime(v[..., 0, :], v[..., 1, :])
        out["bimodality"] = bimodality(v[..., 0, 0] + 0.0)
        out["normalize"] = normalize(v[..., 0, :])
        return out

    base = everything(1.0)
    for scale in (1e-3, 1e3, 37.5):
        scaled = everything(scale)
        for key in base:
            torch.testing.assert_close(scaled[key], base[key], rtol=1e-9, atol=1e-11, equal_nan=True, msg=key)


def test_inputs_are_not_modified_and_dtypes_devices():
    hidden_np, mask_np = make_tokens(seed=10)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        hidden = to_torch(np.where(np.isfinite(hidden_np), np.clip(hidden_np, -6e4, 6e4), hidden_np), dtype)
        mask = torch.tensor(mask_np)
        views = torch.tensor(make_views(m=8, q=2, d=16), dtype=dtype)
        copies = [t.clone() for t in (hidden, mask, views)]
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        results = list(token_metrics(hidden, mask).values())
        results += [prompt_entropy(hidden, mask), curvature(hidden, mask), mean_pool(hidden, mask), normalize(hidden, mask)]
        pooled = views[..., 0, :]
        results += [dataset_entropy(pooled), effective_rank(pooled), infonce(pooled, views[..., 1, :]), lidar(views)]
        results += [dime(pooled, views[..., 1, :]), bimodality(pooled), normalize(pooled)]
        for result in results:
            assert result.dtype == expected and result.device == hidden.device
        for original, copy in zip((hidden, mask, views), copies):
            assert torch.equal(original.view(torch.uint8) if original.dtype != torch.bool else original,
                               copy.view(torch.uint8) if copy.dtype != torch.bool else copy)


def test_inputs_requiring_grad_are_accepted():
    hidden = torch.randn(2, 3, 6, 5, requires_grad=True)
    values = token_metrics(hidden, torch.ones(3, 6, dtype=torch.bool))
    assert all(not v.requires_grad for v in values.values())
    views = torch.randn(2, 6, 2, 5, requires_grad=True)
    assert torch.isfinite(lidar(views)).all() and torch.isfinite(dime(views[..., 0, :], views[..., 1, :])).all()


def test_dime_generator_determinism_and_global_rng_untouched():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 12, 8, generator=gen)
    b = a + 0.3 * torch.randn(2, 12, 8, generator=gen)
    state = torch.get_rng_state()
    first = dime(a, b)
    assert torch.equal(dime(a, b), first)  # default: a fixed-seed generator of its own
    assert torch.equal(torch.get_rng_state(), state)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(dime(a, b, generator=g1), dime(a, b, generator=g2))
    # one layer computed alone equals the same layer in the stack (same permutations for every layer)
    assert torch.equal(dime(a[1], b[1]), first[1])


# ----------------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------------


def test_identical_tokens_do_not_disturb_other_prompts():
    hidden_np, mask_np = make_tokens(layers=2, t=10, d=12, seed=12)
    hidden, mask = torch.tensor(hidden_np), torch.tensor(mask_np)
    base = token_metrics(hidden, mask)
    broken = hidden.clone()
    broken[:, 5] = torch.tensor(np.random.default_rng(0).normal(size=12)) * 1.7  # all tokens of prompt 5 equal
    broken[:, 5] = torch.where(mask[5, :, None], broken[:, 5], float("nan"))
    values = token_metrics(broken, mask)
    for key in PROMPT_METRICS:
        assert torch.isnan(values[key][:, 5]).all() or (values[key][:, 5] == 0).all()
        others = [i for i in range(7) if i != 5]
        torch.testing.assert_close(values[key][:, others], base[key][:, others], rtol=0, atol=0, equal_nan=True)
    # same for a set with two identical rows and nothing else
    assert torch.isnan(dataset_entropy(torch.ones(2, 5))) and torch.isnan(effective_rank(torch.ones(3, 5)))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_token_poisons_only_its_prompt_and_layer(poison):
    hidden_np, mask_np = make_tokens(layers=3, t=10, d=12, side="holes", seed=13)
    hidden, mask = torch.tensor(hidden_np, dtype=torch.float32), torch.tensor(mask_np)
    base = token_metrics(hidden, mask)
    broken = hidden.clone()
    position = int(torch.nonzero(mask[4])[2])
    broken[1, 4, position, 3] = poison
    values = token_metrics(broken, mask)
    for key in PROMPT_METRICS:
        assert torch.isnan(values[key][1, 4])
        expected = base[key].clone()
        expected[1, 4] = math.nan
        torch.testing.assert_close(values[key], expected, rtol=0, atol=0, equal_nan=True)
    pooled = mean_pool(broken, mask)
    assert not torch.isfinite(pooled[1, 4, 3]) and torch.isfinite(pooled[1, 4, :3]).all()
    assert torch.isfinite(pooled[[0, 2]]).all() and torch.isfinite(pooled[1, :4]).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_value_poisons_only_its_layer_for_set_metrics(poison):
    views = torch.tensor(make_views(layers=3, m=10, q=3, d=8, seed=4), dtype=torch.float32)
    broken = views.clone()
    broken[1, 2, 0, 5] = poison  # view 0 of prompt 2
    broken[1, 7, 1, 3] = poison  # view 1 of prompt 7
    a, b = views[..., 0, :], views[..., 1, :]
    ba, bb = broken[..., 0, :], broken[..., 1, :]
    pairs = [
        (dataset_entropy(ba), dataset_entropy(a)),
        (effective_rank(ba), effective_rank(a)),
        (infonce(ba, bb), infonce(a, b)),
        (infonce(bb, ba), infonce(b, a)),
        (lidar(broken), lidar(views)),
        (dime(ba, bb), dime(a, b)),
        (dime(bb, ba), dime(b, a)),
    ]
    for got, clean in pairs:
        assert torch.isnan(got[1])
        torch.testing.assert_close(got[[0, 2]], clean[[0, 2]], rtol=0, atol=0)
    assert torch.isnan(normalize(ba)[1]).all() and torch.equal(normalize(ba)[0], normalize(a)[0])


def test_short_prompts_and_empty_batches():
    hidden = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    values = token_metrics(hidden, mask)
    assert torch.isnan(values["prompt_entropy"][:, [0, 3]]).all()
    assert torch.isfinite(values["prompt_entropy"][:, [1, 2]]).all()
    assert torch.all(values["prompt_entropy"][:, 1].abs() < 1e-12)  # N = 2: one direction, S = 0
    assert torch.isnan(values["curvature"][:, [0, 1, 3]]).all() and torch.isfinite(values["curvature"][:, 2]).all()
    assert torch.isnan(mean_pool(hidden, mask)[:, 3]).all()
    # covariance path (longest prompt 4 > D = 2) with prompts without tokens
    narrow = token_metrics(hidden[..., :2], torch.tensor([[1, 1, 1, 1, 0], [0] * 5, [1, 0, 1, 0, 1], [0] * 5]))
    assert torch.isfinite(narrow["prompt_entropy"][:, [0, 2]]).all() and torch.isnan(narrow["prompt_entropy"][:, [1, 3]]).all()
    assert token_metrics(torch.zeros(2, 0, 5, 3))["curvature"].shape == (2, 0)
    assert token_metrics(torch.zeros(2, 3, 2, 3))["curvature"].isnan().all()  # T < 3
    assert torch.isnan(dataset_entropy(torch.randn(1, 4)))
    with pytest.raises(ValueError):
        prompt_entropy(hidden, mask, alpha=0)
    with pytest.raises(ValueError):
        lidar(torch.randn(4, 2, 3), delta=0)
    with pytest.raises(ValueError):
        infonce(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    hidden_np, mask_np = make_tokens(seed=14)
    hidden, mask = torch.tensor(hidden_np, dtype=torch.float32), torch.tensor(mask_np)
    views = torch.tensor(make_views(m=8, q=2, d=16), dtype=torch.float32)
    cpu = token_metrics(hidden, mask)
    gpu = token_metrics(hidden.cuda(), mask.cuda())
    for key in cpu:
        assert gpu[key].is_cuda
        # float32 products on both devices, rounded differently: each within 1e-4 of float64, so of each other
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=2 * FLOAT32_RTOL, atol=2 * FLOAT32_ATOL, equal_nan=True)
    torch.testing.assert_close(lidar(views.cuda()).cpu(), lidar(views), rtol=1e-6, atol=1e-8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert dime(views[..., 0, :].cuda(), views[..., 1, :].cuda(), generator=gen).is_cuda


def test_threaded_eigenvalues_match_and_restore_the_thread_count():
    """Large CPU batches are split over threads (one intra-op thread each); results and torch's setting unchanged."""
    from layerwatch.metrics.base import _eigvalsh

    generator = torch.Generator().manual_seed(5)
    stacks = []
    for shape in ((3, 20, 24, 10), (7, 32, 40), (5, 16, 3)):  # stacks of several sizes, one batch
        x = torch.randn(*shape, dtype=torch.float64, generator=generator)
        stacks.append(x @ x.transpose(-1, -2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = _eigvalsh(stacks)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [values.shape for values in threaded] == [(3, 20, 24), (7, 32), (5, 16)]
    for values, mats in zip(threaded, stacks):
        np.testing.assert_allclose(values.numpy(), np.linalg.eigvalsh(mats.numpy()), rtol=1e-10, atol=1e-10)


def test_infonce_chance_is_the_mean_over_all_shuffles_that_pair_no_prompt_with_itself():
    """infonce_chance = the average of infonce over every derangement of view B's rows (brute force, M = 5)."""
    import itertools

    from layerwatch.metrics import infonce, infonce_chance

    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    shuffles = [list(p) for p in itertools.permutations(range(5)) if all(p[i] != i for i in range(5))]
    assert len(shuffles) == 44
    brute = torch.stack([infonce(a, b[:, p], temperature=0.1) for p in shuffles]).mean(0)
    torch.testing.assert_close(infonce_chance(a, b, temperature=0.1), brute, rtol=1e-10, atol=1e-10)
    assert (infonce(a, b) < infonce_chance(a, b)).all()  # views that match their prompt beat chance
    assert (infonce_chance(a, b) > math.log(5)).all()  # with temperature 0.1 chance is far above ln M
    assert torch.isnan(infonce_chance(a[:, :1], b[:, :1])).all()  # no other prompt to pair with
