"""Tests of the SPEC §7 metrics (probe_accuracy, best_layer, linear_cka, massive_activation,
prompt_entropy_without_sinks) against independent numpy computations, brute-force loops and analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerwatch.metrics import (
    SINK_NORM_RATIO,
    best_layer,
    check_labels,
    label_folds,
    linear_cka,
    massive_activation,
    probe_accuracy,
    prompt_entropy,
    prompt_entropy_without_sinks,
    sink_tokens,
)


def ref_probe_accuracy(rows: np.ndarray, classes: np.ndarray, fold: np.ndarray, ridge: float) -> float:
    """Primal ridge regression with intercept on normalized rows, one fold at a time (numpy, D x D systems)."""
    z = rows - rows.mean(0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    targets = np.eye(classes.max() + 1)[classes]
    correct = 0
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        mu = z[train].mean(0)
        x = z[train] - mu
        y_mean = targets[train].mean(0)
        lam = ridge * (x * x).sum() / train.sum()
        w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ (targets[train] - y_mean))
        scores = (z[test] - mu) @ w + y_mean
        correct += int((scores.argmax(1) == classes[test]).sum())
    return correct / len(classes)


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Primal (feature-space) linear CKA: ||Yᵀ X||² / (||Xᵀ X|| ||Yᵀ Y||) on centered columns."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


# ------------------------------------------------------------------------------------------- probe_accuracy
@pytest.mark.parametrize("classes,m,d", [(2, 40, 8), (3, 45, 60), (4, 60, 5)])
def test_probe_accuracy_matches_primal_numpy_reference(classes, m, d):
    g = torch.Generator().manual_seed(classes)
    labels = torch.arange(m) % classes
    centers = 1.5 * torch.randn(classes, d, generator=g)
    pooled = centers[labels] + torch.randn(3, m, d, generator=g, dtype=torch.float64) + 5.0  # 3 "layers"
    got = probe_accuracy(pooled, labels, seed=7)
    fold = label_folds(labels, seed=7).numpy()
    for layer in range(3):
        expected = ref_probe_accuracy(pooled[layer].numpy(), labels.numpy(), fold, 1.0)
        assert float(got[layer]) == pytest.approx(expected, abs=1e-12)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert 0.3 < float(got.min()) and float(got.max()) <= 1.0


def test_probe_accuracy_separable_direction_is_perfect_and_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(0)
    m, d = 100, 32
    labels = torch.randint(0, 2, (m,), generator=g)
    labels[:5], labels[5:10] = 0, 1
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    noise = torch.randn(m, d, generator=g)
    separable = noise + 8.0 * (2 * labels - 1)[:, None] * direction  # classes apart along one known direction
    assert float(probe_accuracy(separable, labels)) == 1.0
    # random labels: each prompt is tested by a classifier that never saw it -> chance (0.5) on average
    chance = [float(probe_accuracy(torch.randn(m, d, generator=g), labels, seed=s)) for s in range(20)]
    assert abs(np.mean(chance) - 0.5) < 0.05
    assert max(chance) < 0.7
    # the same with high dimension (D >> M, where the training set is always interpolated)
    wide = [float(probe_accuracy(torch.randn(m, 500, generator=g), labels, seed=s)) for s in range(10)]
    assert abs(np.mean(wide) - 0.5) < 0.07


def test_probe_accuracy_is_invariant_to_label_names_and_scale_and_nan_poisons_only_its_layer():
    g = torch.Generator().manual_seed(1)
    labels = [("neg", "pos", "mixed")[i % 3] for i in range(30)]
    pooled = torch.randn(2, 30, 6, generator=g)
    pooled[0, :, 0] += torch.tensor([3.0 * (i % 3) for i in range(30)])
    base = probe_accuracy(pooled, labels)
    assert torch.equal(probe_accuracy(pooled * 1000.0, labels), base)
    assert torch.equal(probe_accuracy(pooled, [i % 3 for i in range(30)]), base)  # the same classes, other names
    poisoned = pooled.clone()
    poisoned[1, 3, 2] = math.nan
    out = probe_accuracy(poisoned, labels)
    assert out[0] == base[0] and torch.isnan(out[1])


def test_label_folds_are_stratified_balanced_and_fixed_by_the_seed():
    classes = torch.tensor([0] * 13 + [1] * 7 + [2] * 20)
    fold = label_folds(classes, folds=5, seed=3)
    assert torch.equal(fold, label_folds(classes, folds=5, seed=3))
    assert not torch.equal(fold, label_folds(classes, folds=5, seed=4))
    sizes = torch.bincount(fold, minlength=5)
    assert int(sizes.max() - sizes.min()) <= 1
    for c, n in ((0, 13), (1, 7), (2, 20)):
        per_fold = torch.bincount(fold[classes == c], minlength=5)
        assert int(per_fold.min()) >= n // 5 and int(per_fold.max()) <= math.ceil(n / 5)


def test_check_labels_refuses_one_class_small_classes_and_wrong_length():
    with pytest.raises(ValueError, match="at least two classes"):
        check_labels([1] * 10)
    with pytest.raises(ValueError, match="at least 5 prompts.*'b': 4"):
        check_labels(["a"] * 6 + ["b"] * 4)
    with pytest.raises(ValueError, match="3 entries but the probe has 4"):
        check_labels([0, 1, 0], num_prompts=4)
    with pytest.raises(TypeError, match="labels"):
        check_labels(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        probe_accuracy(torch.randn(10, 3), [0] * 9 + [1])


def test_best_layer_takes_the_earliest_maximum_and_ignores_nan():
    assert best_layer(torch.tensor([0.2, 0.8, 0.8, 0.1])) == 1
    assert best_layer([math.nan, 0.3, 0.7, 0.7]) == 2
    assert best_layer(torch.tensor([math.nan, math.nan])) is None


# ----------------------------------------------------------------------------------------------- linear_cka
def test_linear_cka_matches_primal_numpy_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 30, 12, generator=g, dtype=torch.float64)
    y = x[..., :7] @ torch.randn(7, 20, generator=g, dtype=torch.float64) + torch.randn(4, 30, 20, generator=g, dtype=torch.float64)
    got = linear_cka(x, y)
    for layer in range(4):
        assert float(got[layer]) == pytest.approx(ref_cka(x[layer].numpy(), y[layer].numpy()), rel=1e-10)


def test_linear_cka_is_one_under_rotation_scaling_and_shift():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, 16, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    moved = 7.5 * x @ rotation + 3.0
    assert torch.allclose(linear_cka(x, moved), torch.ones(3), atol=1e-6)
    assert torch.allclose(linear_cka(x, x), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("m,d", [(200, 10), (100, 100)])
def test_linear_cka_of_independent_sets_is_near_the_small_sample_baseline(m, d):
    """E[CKA] ≈ D / (M + D) for independent isotropic Gaussians (Wishart moments: E tr(W²) = n p (n + p + 1))."""
    g = torch.Generator().manual_seed(m)
    values = linear_cka(torch.randn(40, m, d, generator=g), torch.randn(40, m, d, generator=g))
    assert float(values.mean()) == pytest.approx(d / (m + d), rel=0.05)


def test_linear_cka_degenerate_and_shape_errors():
    assert torch.isnan(linear_cka(torch.ones(5, 3), torch.randn(5, 3)))
    with pytest.raises(ValueError, match="same prompts"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))


# -------------------------------------------------------------------------------------- massive activations
def test_massive_activation_matches_a_loop_with_padding():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 9, 5, generator=g)
    hidden[:, 1, 0] *= 400.0
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, :3] = False  # left padding
    hidden[:, 0, 7] = math.inf  # garbage in a padded slot
    got = massive_activation(hidden, mask)
    for layer in range(2):
        for b in range(4):
            norms = np.linalg.norm(hidden[layer, b][mask[b]].double().numpy(), axis=1)
            assert float(got[layer, b]) == pytest.approx(norms.max() / np.median(norms), rel=1e-6)
    assert float(got[0, 1]) > 50 * float(got[0, 3])


def test_sink_tokens_and_entropy_without_them_equal_the_entropy_of_the_prompt_without_that_token():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 12, 8, generator=g, dtype=torch.float64)
    hidden[1, :, 0] += 500.0  # a massive first token at layer 1 only
    hidden[2, 3, 4] += 500.0  # and one token in the middle of prompt 3 at layer 2
    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[4, 9:] = False
    sinks = sink_tokens(hidden, mask)
    expected = torch.zeros_like(sinks)
    expected[1, :, 0] = True
    expected[2, 3, 4] = True
    assert torch.equal(sinks, expected)
    full = prompt_entropy(hidden, mask)
    got = prompt_entropy_without_sinks(hidden, mask)
    reused = prompt_entropy_without_sinks(hidden, mask, entropy=full)
    assert torch.allclose(got, reused, rtol=1e-12, atol=0)
    assert torch.equal(got[0], full[0])  # no sink: identical
    for b in range(5):
        n = int(mask[b].sum())
        assert float(got[1, b]) == pytest.approx(float(prompt_entropy(hidden[1, b, 1:n][None])[0]), rel=1e-9)
    without = torch.cat([hidden[2, 3, :4], hidden[2, 3, 5:]])[None]
    assert float(got[2, 3]) == pytest.approx(float(prompt_entropy(without)[0]), rel=1e-9)
    assert float(full[1].mean()) < 0.5 < float(got[1].mean())  # the sink looked like a collapse


def test_sink_threshold_is_a_documented_multiple_of_the_median():
    tokens = torch.zeros(1, 5, 2)
    tokens[0, :, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    tokens[0, 4, 1] = SINK_NORM_RATIO * 0.99
    assert not bool(sink_tokens(tokens).any())
    tokens[0, 4, 1] = SINK_NORM_RATIO * 1.01
    assert sink_tokens(tokens).tolist() == [[False, False, False, False, True]]
    assert sink_tokens(tokens, ratio=20.0).sum() == 0
    with pytest.raises(ValueError, match="ratio"):
        sink_tokens(tokens, ratio=0.5)
