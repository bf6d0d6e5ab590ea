"""Independent float64 references for the metrics (numpy, plain Python loops) and the inputs the metric tests share.

The references follow SPEC §1 literally: one prompt and one layer at a time, the full N x N Gram matrix for every
entropy, direct difference vectors for curvature, D x D matrices for LiDAR and scipy.stats for the bimodality
coefficient. From layerwatch they take only the spec's eigenvalue cut-off (``EIGENVALUE_RTOL``), never its code.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch

from layerwatch.metrics import EIGENVALUE_RTOL

RTOL = 1e-6  # SPEC: agreement with a float64 evaluation, relative (float64 inputs)
ATOL = 1e-8  # ... and absolute near zero
# float32/bfloat16 inputs are reduced with float32 products (issue 12): 1e-4 relative, 1e-6 absolute near zero
FLOAT32_RTOL = 1e-4
FLOAT32_ATOL = 1e-6
ZERO_ROW_RTOL = 1e-10
CURVATURE_ZERO_TOL = 1e-10

# token_metrics() values with one number per prompt (besides them: "mean_pool", one vector per prompt)
PROMPT_METRICS = ("prompt_entropy", "curvature", "curvature_abs")


# ----------------------------------------------------------------------------------------------------
# independent references (numpy float64, loops)
# ----------------------------------------------------------------------------------------------------


def ref_normalize(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(axis=0)
    centered = rows - mean
    out = np.zeros_like(centered)
    norms = [math.sqrt(float(np.dot(r, r))) for r in centered]
    scale = max([math.sqrt(float(np.dot(mean, mean)))] + norms)
    for i, r in enumerate(centered):
        if norms[i] > ZERO_ROW_RTOL * scale:
            out[i] = r / norms[i]
    return out


def ref_entropy_from_eigenvalues(lam: np.ndarray, alpha: float) -> float:
    lam = np.asarray(lam, dtype=np.float64)
    if not np.all(np.isfinite(lam)) or lam.max() <= 0:
        return math.nan
    lam = lam[lam > EIGENVALUE_RTOL * lam.max()]
    p = lam / lam.sum()
    if alpha == 1.0:
        return float(-sum(pi * math.log(pi) for pi in p))
    return float(math.log(sum(pi**alpha for pi in p)) / (1.0 - alpha))


def ref_matrix_entropy(z: np.ndarray, alpha: float) -> float:
    return ref_entropy_from_eigenvalues(np.linalg.eigvalsh(z @ z.T), alpha)


def valid_rows(hidden: np.ndarray, mask: np.ndarray, layer: int, prompt: int) -> np.ndarray:
    return np.asarray(hidden[layer, prompt][mask[prompt]], dtype=np.float64)


def ref_prompt_entropy(hidden, mask, alpha=1.0, normalized=True) -> np.ndarray:
    layers, prompts, _, d = hidden.shape
    out = np.full((layers, prompts), np.nan)
    for layer in range(layers):
        for prompt in range(prompts):
            x = valid_rows(hidden, mask, layer, prompt)
            n = len(x)
            if n < 2 or not np.all(np.isfinite(x)):
                continue
            value = ref_matrix_entropy(ref_normalize(x), alpha)
            out[layer, prompt] = value / math.log(min(n, d)) if normalized else value
    return out


def ref_curvature(hidden, mask, absolute=False) -> np.ndarray:
    layers, prompts = hidden.shape[:2]
    out = np.full((layers, prompts), np.nan)
    for layer in range(layers):
        for prompt in range(prompts):
            x = valid_rows(hidden, mask, layer, prompt)
            if len(x) < 3 or not np.all(np.isfinite(x)):
                continue
            z = ref_normalize(x)
            angles = []
            for k in range(len(z) - 2):
                v1, v2 = z[k + 1] - z[k], z[k + 2] - z[k + 1]
                n1, n2 = float(np.dot(v1, v1)), float(np.dot(v2, v2))
                if n1 <= CURVATURE_ZERO_TOL or n2 <= CURVATURE_ZERO_TOL:
                    continue
                cos = float(np.dot(v1, v2)) / math.sqrt(n1 * n2)
                cos = min(1.0, max(-1.0, abs(cos) if absolute else cos))
                angles.append(math.acos(cos))
            if angles:
                out[layer, prompt] = sum(angles) / len(angles)
    return out


def ref_mean_pool(hidden, mask) -> np.ndarray:
    layers, prompts, _, d = hidden.shape
    out = np.zeros((layers, prompts, d))
    for layer in range(layers):
        for prompt in range(prompts):
            out[layer, prompt] = valid_rows(hidden, mask, layer, prompt).mean(axis=0)
    return out


def ref_dataset_entropy(pooled, alpha=1.0, normalized=True) -> float:
    pooled = np.asarray(pooled, dtype=np.float64)
    if not np.all(np.isfinite(pooled)):
        return math.nan
    m, d = pooled.shape
    value = ref_matrix_entropy(ref_normalize(pooled), alpha)
    return value / math.log(min(m, d)) if normalized else value


def ref_effective_rank(pooled) -> float:
    pooled = np.asarray(pooled, dtype=np.float64)
    if not np.all(np.isfinite(pooled)):
        return math.nan
    sigma = np.linalg.svd(ref_normalize(pooled), compute_uv=False)
    sigma = sigma[sigma**2 > EIGENVALUE_RTOL * sigma.max() ** 2]
    p = sigma / sigma.sum()
    return math.exp(-sum(pi * math.log(pi) for pi in p))


def ref_infonce(view_a, view_b, temperature=0.1) -> float:
    view_a, view_b = np.asarray(view_a, np.float64), np.asarray(view_b, np.float64)
    if not (np.all(np.isfinite(view_a)) and np.all(np.isfinite(view_b))):
        return math.nan
    a, b = ref_normalize(view_a), ref_normalize(view_b)
    m = len(a)
    total = 0.0
    for i in range(m):
        logits = [float(np.dot(a[i], b[j])) / temperature for j in range(m)]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[i]
    return total / m


def ref_lidar(views, alpha=1.0, delta=1e-4) -> float:
    views = np.asarray(views, dtype=np.float64)
    if not np.all(np.isfinite(views)):
        return math.nan
    m, q, d = views.shape
    z = ref_normalize(views.reshape(m * q, d)).reshape(m, q, d)
    class_means = z.mean(axis=1)
    grand = class_means.mean(axis=0)
    sigma_b = np.zeros((d, d))
    for i in range(m):
        sigma_b += np.outer(class_means[i] - grand, class_means[i] - grand)
    sigma_b /= m
    sigma_w = np.zeros((d, d))
    for i in range(m):
        for j in range(q):
            sigma_w += np.outer(z[i, j] - class_means[i], z[i, j] - class_means[i])
    sigma_w = sigma_w / (m * q) + delta * np.eye(d)
    w_eig, w_vec = np.linalg.eigh(sigma_w)
    inv_sqrt = w_vec @ np.diag(w_eig**-0.5) @ w_vec.T
    lda = inv_sqrt @ sigma_b @ inv_sqrt
    return ref_entropy_from_eigenvalues(np.linalg.eigvalsh(0.5 * (lda + lda.T)), alpha)


def ref_dime(view_a, view_b, perms, alpha=1.0) -> float:
    view_a, view_b = np.asarray(view_a, np.float64), np.asarray(view_b, np.float64)
    if not (np.all(np.isfinite(view_a)) and np.all(np.isfinite(view_b))):
        return math.nan
    a, b = ref_normalize(view_a), ref_normalize(view_b)
    ka, kb = a @ a.T, b @ b.T

    def joint(k):
        h = ka * k
        return ref_entropy_from_eigenvalues(np.linalg.eigvalsh(h / np.trace(h)), alpha)

    permuted = [joint(kb[np.ix_(p, p)]) for p in perms]
    return float(np.mean(permuted) - joint(kb))


def ref_bimodality(values) -> float:
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 4:
        return math.nan
    g = scipy.stats.skew(x, bias=False)
    k = scipy.stats.kurtosis(x, bias=False)
    return float((g * g + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

GARBAGE = [1e30, float("nan"), float("inf"), -3e38, 7.0]


def make_mask(lengths, t, side, rng) -> np.ndarray:
    mask = np.zeros((len(lengths), t), dtype=bool)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = True
        elif side == "left":
            mask[i, t - n :] = True
        else:  # holes anywhere
            mask[i, rng.choice(t, size=n, replace=False)] = True
    return mask


def make_tokens(layers=2, prompts=7, t=12, d=16, side="right", seed=0, lengths=None, rank=None):
    """Random hidden states with a common offset and some structure; garbage in padded slots."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = [1, 2, 3, t] + list(rng.integers(4, t + 1, size=prompts - 4))
    mask = make_mask(lengths, t, side, rng)
    rank = rank or d
    basis = rng.normal(size=(layers, 1, rank, d))
    coeff = rng.normal(size=(layers, len(lengths), t, rank))
    hidden = coeff @ basis + 3.0 * rng.normal(size=(layers, 1, 1, d))
    hidden = hidden + 0.1 * rng.normal(size=hidden.shape) * (rank == d)
    garbage = rng.choice(GARBAGE, size=hidden.shape)
    hidden = np.where(mask[None, :, :, None], hidden, garbage)
    return hidden, mask


def to_torch(array, dtype):
    return torch.tensor(np.asarray(array), dtype=dtype)


def reference_input(tensor: torch.Tensor) -> np.ndarray:
    """The exact values the function sees, in float64 (float32 inputs are compared on their own values)."""
    return tensor.to(torch.float64).numpy()


def assert_close(actual: torch.Tensor, expected, rtol=None, atol=None):
    """Agreement with a float64 reference: 1e-6 relative for float64 results, 1e-4 for float32 ones (float32 and
    lower-precision inputs), unless given."""
    single = actual.dtype != torch.float64
    rtol = (FLOAT32_RTOL if single else RTOL) if rtol is None else rtol
    atol = (FLOAT32_ATOL if single else ATOL) if atol is None else atol
    np.testing.assert_allclose(actual.to(torch.float64).numpy(), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


def make_views(layers=2, m=12, q=3, d=20, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(layers, m, 1, d)) + 2.0 * rng.normal(size=(layers, 1, 1, d))
    return base + noise * rng.normal(size=(layers, m, q, d))
