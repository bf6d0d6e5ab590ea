"""Set-level metrics (SPEC §1): one row per prompt (dataset entropy, RankMe) or per view (InfoNCE, DiME, LiDAR),
and the bimodality of per-prompt values."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import Tensor

import layerwatch.metrics.names as names
from layerwatch.metrics.base import (
    _DIME_MATRICES_PER_ITEM,
    _INFONCE_MATRICES_PER_ITEM,
    SET_CHUNK_BYTES,
    ZERO_ROW_RTOL,
    _center_unit,
    _check_alpha,
    _check_real,
    _check_sets,
    _gram,
    _gram_eigenvalues,
    _kept_eigenvalues,
    _matrix_entropies,
    _result_dtype,
)
from layerwatch.metrics.dimension import TWONN_MATRICES_PER_ITEM

logger = logging.getLogger("layerwatch.metrics")

def _dime_permutations(m: int, n_permutations: int, generator: torch.Generator | None) -> Tensor:
    """``[n_permutations, m]`` uniformly random permutations from ``generator`` (its own device)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    keys = torch.rand(n_permutations, m, generator=generator, dtype=torch.float64, device=generator.device)
    return keys.argsort(dim=-1)


def set_level_peak_bytes(num_prompts: int, metrics: Iterable[str]) -> int:
    """Estimated peak working memory (bytes) of the set-level step for ``num_prompts`` prompts and these metric
    names: the part that grows like ``M²`` (and beyond :data:`SET_CHUNK_BYTES`, cannot be chunked away): one
    DiME item of :data:`_DIME_MATRICES_PER_ITEM` ``M x M`` float64 matrices, InfoNCE's ``M x M`` logits of one
    layer, intrinsic dimension's distances of one layer. The pooled rows the metrics start from (``layers x M x D``) come on top; they grow only linearly.
    Eigendecomposition time grows like ``M³`` per layer and permutation.
    """
    selected, m = set(metrics), int(num_prompts)
    item = 0
    if names.DIME in selected:
        item = max(item, _DIME_MATRICES_PER_ITEM * m * m * 8)
    if names.INFONCE in selected or names.INFONCE_CHANCE in selected:
        item = max(item, _INFONCE_MATRICES_PER_ITEM * m * m * 8)
    if names.INTRINSIC_DIMENSION in selected:
        item = max(item, TWONN_MATRICES_PER_ITEM * m * m * 8)
    return max(item, SET_CHUNK_BYTES) if item else 0  # chunks fill up to SET_CHUNK_BYTES, or hold one item


def _chunk_items(item_bytes: int) -> int:
    """How many items of ``item_bytes`` working memory each fit in one chunk of :data:`SET_CHUNK_BYTES` (>= 1)."""
    return max(1, SET_CHUNK_BYTES // max(1, item_bytes))


def _dime_entropies(a: Tensor, b: Tensor, perms: Tensor, alpha: float) -> Tensor:
    """``[..., R]``: H(K_A ∘ P_r K_B P_rᵀ) for the rows ``perms[R, M]``, chunked over (layer, permutation) pairs.

    Each chunk builds only the kernels of the layers it touches and its own Hadamard products, so the working
    set is a few ``M x M`` matrices per item, whatever the number of layers and permutations.
    """
    lead, m = a.shape[:-2], a.shape[-2]
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    count = perms.shape[0]
    total = flat_a.shape[0] * count
    out = torch.empty(total, dtype=torch.float64, device=a.device)
    step = _chunk_items(_DIME_MATRICES_PER_ITEM * m * m * 8)
    for start in range(0, total, step):
        stop = min(start + step, total)
        first, last = start // count, (stop - 1) // count + 1
        kernel_a = flat_a[first:last] @ flat_a[first:last].mT  # [l, M, M], only the layers of this chunk
        kernel_b = flat_b[first:last] @ flat_b[first:last].mT
        index = torch.arange(start, stop, device=a.device)
        layer, rows = index // count - first, perms[index % count]
        stack = kernel_b[layer[:, None, None], rows[:, :, None], rows[:, None, :]]  # [c, M, M]
        stack.mul_(kernel_a[layer])
        del kernel_a, kernel_b
        out[start:stop] = _matrix_entropies([stack], alpha)[0]
    return out.reshape(*lead, count)


def _infonce_losses(a: Tensor, b: Tensor, temperature: float, *, chance: bool = False) -> Tensor:
    """``[...]`` InfoNCE of unit rows ``a, b[..., M, D]``, over chunks of (layer, query rows): the ``M x M``
    logits of all layers never exist at once. ``chance=True``: the positive of row i is the mean of its M - 1
    other logits (the expected loss over uniformly random shuffles that pair no prompt with itself)."""
    lead, m = a.shape[:-2], a.shape[-2]
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    total = torch.zeros(flat_a.shape[0], dtype=torch.float64, device=a.device)
    layers_per = _chunk_items(_INFONCE_MATRICES_PER_ITEM * m * m * 8)
    rows_per = m if layers_per > 1 else _chunk_items(_INFONCE_MATRICES_PER_ITEM * m * 8)
    for first in range(0, flat_a.shape[0], layers_per):
        layers = slice(first, first + layers_per)
        for row in range(0, m, rows_per):
            rows = slice(row, row + rows_per)
            logits = (flat_a[layers, rows] @ flat_b[layers].mT) / temperature  # [l, r, M]
            positive = torch.diagonal(logits, row, -2, -1)  # row i of the block pairs with column row + i
            if chance:
                positive = (logits.sum(-1) - positive) / (m - 1)
            total[layers] += (torch.logsumexp(logits, dim=-1) - positive).sum(-1)
    return (total / m).reshape(lead)


def _lidar_kernel(z: Tensor, delta: float, method: str = "auto") -> Tensor:
    """Symmetric matrix whose non-zero spectrum is that of Σ_w^{-1/2} Σ_b Σ_w^{-1/2}.

    ``z[..., M, Q, D]`` are rows already normalized jointly over all M·Q rows (float64, finite).
    ``method``: "woodbury" works in the M·Q-sized space (Σ_w^{-1} via the Woodbury identity and the
    within-class Gram), "direct" in the D-sized space (Cholesky of the D x D Σ_w); "auto" picks the
    smaller.
    """
    *lead, m, q, d = z.shape
    class_means = z.mean(-2)  # [..., M, D]
    grand_mean = class_means.mean(-2, keepdim=True)
    between = (class_means - grand_mean).mT / math.sqrt(m)  # B [..., D, M]: Σ_b = B Bᵀ
    within = (z - class_means.unsqueeze(-2)).reshape(*lead, m * q, d) / math.sqrt(m * q)  # W̃: Σ_w = W̃ᵀW̃ + δI
    if method == "auto":
        method = "woodbury" if m * q < d else "direct"
    if method == "woodbury":
        # Bᵀ Σ_w^{-1} B = (BᵀB - (W̃B)ᵀ (δI + W̃W̃ᵀ)^{-1} (W̃B)) / δ      (M x M)
        small = within @ within.mT
        small.diagonal(dim1=-2, dim2=-1).add_(delta)
        cross = within @ between  # [..., MQ, M]
        factor, info = torch.linalg.cholesky_ex(small)
        solved = torch.cholesky_solve(cross, factor)
        kernel = (between.mT @ between - cross.mT @ solved) / delta
        kernel = 0.5 * (kernel + kernel.mT)
    elif method == "direct":
        # L^{-1} B with Σ_w = L Lᵀ: (L^{-1}B)(L^{-1}B)ᵀ is similar to Σ_w^{-1} Σ_b
        sigma_w = within.mT @ within
        sigma_w.diagonal(dim1=-2, dim2=-1).add_(delta)
        factor, info = torch.linalg.cholesky_ex(sigma_w)
        scaled = torch.linalg.solve_triangular(factor, between, upper=False)  # [..., D, M]
        kernel = scaled @ scaled.mT if d <= m else scaled.mT @ scaled
    else:
        raise ValueError(f"unknown LiDAR method {method!r}")
    failed = info != 0
    if bool(failed.any()):
        logger.debug("lidar: Cholesky factorization failed for %d of %d sets", int(failed.sum()), failed.numel())
        kernel = torch.where(failed[..., None, None], math.nan, kernel)
    return kernel


@torch.no_grad()
def dataset_entropy(pooled: Tensor, *, alpha: float = 1.0, normalized: bool = True) -> Tensor:
    """Matrix Rényi entropy of the set of pooled prompt embeddings (SPEC §1).

    ``Z = normalize(pooled)`` over the M rows, ``S_alpha(Z)``; if ``normalized``, divided by
    ``ln(min(M, D))``.

    Args:
        pooled: ``[..., M, D]``, one row per prompt (e.g. from :func:`mean_pool`).
        alpha: Rényi order.
        normalized: divide by ``ln(min(M, D))``.

    Returns:
        ``[...]``; NaN for M < 2 and for sets holding non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import dataset_entropy
        >>> pooled = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
        >>> dataset_entropy(pooled, normalized=False), dataset_entropy(pooled)
        (tensor(0.6931), tensor(0.6309))
    """
    _check_sets(pooled, "pooled")
    alpha = _check_alpha(alpha)
    m, d = pooled.shape[-2], pooled.shape[-1]
    z, bad = _center_unit(pooled, None)
    result = _matrix_entropies([_gram(z)], alpha)[0]
    if normalized:
        result = result / math.log(min(m, d)) if min(m, d) > 1 else torch.full_like(result, math.nan)
    if m < 2:
        result = torch.full_like(result, math.nan)
    return torch.where(bad, math.nan, result).to(_result_dtype(pooled))


@torch.no_grad()
def effective_rank(pooled: Tensor) -> Tensor:
    """RankMe effective rank of the pooled embeddings (SPEC §1).

    ``sigma`` = singular values of ``normalize(pooled)`` (square roots of the Gram eigenvalues, the same
    relative threshold applied to ``sigma**2``), ``p = sigma / sum(sigma)``, ``exp(-sum p ln p)``.

    Args:
        pooled: ``[..., M, D]``, one row per prompt.

    Returns:
        ``[...]``, between 1 and ``min(M - 1, D)``; NaN for sets with non-finite values or no spread.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import effective_rank
        >>> pooled = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
        >>> effective_rank(pooled)
        tensor(2.0000)
    """
    _check_sets(pooled, "pooled")
    z, bad = _center_unit(pooled, None)
    kept, undefined = _kept_eigenvalues(_gram_eigenvalues(z))
    sigma = torch.sqrt(kept)
    p = sigma / sigma.sum(-1, keepdim=True)
    result = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    return torch.where(bad | undefined, math.nan, result).to(_result_dtype(pooled))


@torch.no_grad()
def infonce(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """InfoNCE loss between two views of the same prompts (SPEC §1), in nats.

    ``A = normalize(view_a)``, ``B = normalize(view_b)`` (each over its own M rows);
    ``L = mean_i -log softmax_j(<a_i, b_j> / temperature)[i]``. Lower means the views of a prompt are
    identifiable among the others. Compare it with :func:`infonce_chance` (the same layer, shuffled pairing), not
    with ``ln M``: with a small temperature a layer whose nearest neighbours are other prompts scores far above
    ``ln M``.

    Args:
        view_a: ``[..., M, D]`` pooled embeddings of view A.
        view_b: ``[..., M, D]`` pooled embeddings of view B (row i = same prompt as row i of A).
        temperature: softmax temperature.

    Returns:
        ``[...]``; NaN for layers with non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import infonce
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> infonce(a, a, temperature=1.0), infonce(a, a[[1, 0, 3, 2]], temperature=1.0)
        (tensor(0.6265), tensor(2.6265))
    """
    return _infonce(view_a, view_b, temperature, chance=False)


@torch.no_grad()
def infonce_chance(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """InfoNCE of the same views under a shuffled pairing: a measured chance baseline for :func:`infonce`, in nats.

    With ``logits = <a_i, b_j> / temperature`` as in :func:`infonce`, each prompt's view A is paired with the view B
    of another prompt chosen uniformly at random, and the loss is averaged over all such shuffles (derangements)
    exactly: ``mean_i [logsumexp_j logits_ij - mean_{j != i} logits_ij]``. It is what InfoNCE would be if this
    layer could not tell a prompt's own view from the others', measured on the same layer, so ``infonce`` below it
    means better than chance. It is not ``ln M``: with temperature 0.1 it can be far above it.

    Args:
        view_a: ``[..., M, D]`` pooled embeddings of view A (M >= 2).
        view_b: ``[..., M, D]`` pooled embeddings of view B.
        temperature: softmax temperature (the same as :func:`infonce`'s).

    Returns:
        ``[...]``; NaN for layers with non-finite values and for M < 2.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import infonce_chance
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> infonce_chance(a, a, temperature=1.0)
        tensor(1.9599)
    """
    return _infonce(view_a, view_b, temperature, chance=True)


def _infonce(view_a: Tensor, view_b: Tensor, temperature: float, *, chance: bool) -> Tensor:
    _check_sets(view_a, "view_a")
    _check_sets(view_b, "view_b")
    if view_a.shape[-2:] != view_b.shape[-2:]:
        raise ValueError(f"views must have the same [M, D], got {tuple(view_a.shape)} and {tuple(view_b.shape)}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}")
    a, bad_a = _center_unit(view_a, None)
    b, bad_b = _center_unit(view_b, None)
    loss = _infonce_losses(a, b, temperature, chance=chance)
    dtype = torch.float64 if torch.float64 in (view_a.dtype, view_b.dtype) else torch.float32
    return torch.where(bad_a | bad_b, math.nan, loss).to(dtype)


@torch.no_grad()
def lidar(views: Tensor, *, alpha: float = 1.0, delta: float = 1e-4) -> Tensor:
    """LiDAR: matrix entropy of the LDA matrix of augmented views (SPEC §1), in nats.

    ``Z = normalize`` over all ``M·Q`` rows jointly; prompt i is a class with views ``z_ij``; class means
    ``mu_i``, grand mean ``mu``; ``Σ_b = (1/M) Σ_i (mu_i-mu)(mu_i-mu)ᵀ``,
    ``Σ_w = (1/(MQ)) Σ_ij (z_ij-mu_i)(z_ij-mu_i)ᵀ + delta I``; returns ``S_alpha(Σ_w^{-1/2} Σ_b Σ_w^{-1/2})``
    (``exp`` of it is the LiDAR effective rank). The spectrum is computed in an ``M·Q``-sized space with the
    Woodbury identity when ``M·Q < D`` and with ``D x D`` matrices otherwise.

    Args:
        views: ``[..., M, Q, D]``, Q views (e.g. pooled augmentations) of each of M prompts.
        alpha: Rényi order.
        delta: ridge added to Σ_w (absolute, on unit-norm rows).

    Returns:
        ``[...]``; NaN for layers with non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import lidar
        >>> views = torch.tensor([[[1.0, 0.0, 0.1], [1.0, 0.0, -0.1]],     # 4 prompts x 2 views:
        ...                       [[-1.0, 0.0, 0.1], [-1.0, 0.0, -0.1]],   # classes spread evenly over
        ...                       [[0.0, 1.0, 0.1], [0.0, 1.0, -0.1]],     # a plane, views differ only
        ...                       [[0.0, -1.0, 0.1], [0.0, -1.0, -0.1]]])  # along a third axis
        >>> lidar(views)  # two equal LDA eigenvalues: ln 2
        tensor(0.6931)
    """
    _check_sets(views, "views", min_dim=3)
    alpha = _check_alpha(alpha)
    delta = float(delta)
    if not delta > 0:
        raise ValueError(f"`delta` must be positive, got {delta}")
    *lead, m, q, d = views.shape
    z, bad = _center_unit(views.reshape(*lead, m * q, d), None)
    if bool(bad.any()):
        z = torch.where(bad[..., None, None], 0.0, z)
    kernel = _lidar_kernel(z.reshape(*lead, m, q, d), delta)
    result = _matrix_entropies([kernel], alpha)[0]
    return torch.where(bad, math.nan, result).to(_result_dtype(views))


@torch.no_grad()
def dime(
    view_a: Tensor,
    view_b: Tensor,
    *,
    alpha: float = 1.0,
    n_permutations: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DiME: difference of matrix-based entropies between permuted and true view pairings (SPEC §1).

    ``A, B`` normalized as in :func:`infonce`; ``K_A = A Aᵀ``, ``K_B = B Bᵀ`` (always ``M x M``);
    ``H(K) = S_alpha`` of the trace-normalized Hadamard product;
    ``DiME = mean_P H(K_A ∘ P K_B Pᵀ) - H(K_A ∘ K_B)`` over ``n_permutations`` random permutations. The same
    permutations are used for every leading index (layer), so layers are compared on equal terms. The
    ``(layer, permutation)`` matrices are built and decomposed in chunks of at most :data:`SET_CHUNK_BYTES`, so
    memory does not grow with the permutation count or the number of layers (see :func:`set_level_peak_bytes`).

    Args:
        view_a: ``[..., M, D]`` pooled embeddings of view A.
        view_b: ``[..., M, D]`` pooled embeddings of view B.
        alpha: Rényi order.
        n_permutations: number of random permutations.
        generator: source of the permutations; ``None`` uses a fresh generator seeded with 0 (the global
            RNG is never touched).

    Returns:
        ``[...]`` in nats; about 0 when views are unrelated, positive when they share sample structure.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import dime
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> dime(a, a, generator=torch.Generator().manual_seed(0))  # identical views share structure
        tensor(0.4159)
    """
    _check_sets(view_a, "view_a")
    _check_sets(view_b, "view_b")
    if view_a.shape[-2:-1] != view_b.shape[-2:-1]:
        raise ValueError(f"views must have the same number of rows M, got {tuple(view_a.shape)} and {tuple(view_b.shape)}")
    alpha = _check_alpha(alpha)
    if int(n_permutations) != n_permutations or n_permutations < 1:
        raise ValueError(f"`n_permutations` must be a positive integer, got {n_permutations}")
    m = view_a.shape[-2]
    a, bad_a = _center_unit(view_a, None)
    b, bad_b = _center_unit(view_b, None)
    perms = _dime_permutations(m, int(n_permutations), generator).to(view_a.device)  # [P, M]
    identity = torch.arange(m, device=view_a.device).unsqueeze(0)
    entropies = _dime_entropies(a, b, torch.cat([identity, perms]), alpha)  # [..., 1 + P]
    result = entropies[..., 1:].mean(-1) - entropies[..., 0]
    dtype = torch.float64 if torch.float64 in (view_a.dtype, view_b.dtype) else torch.float32
    return torch.where(bad_a | bad_b, math.nan, result).to(dtype)


@torch.no_grad()
def bimodality(values: Tensor, dim: int = -1) -> Tensor:
    """Sarle's bimodality coefficient of the finite values along ``dim`` (SPEC §1).

    ``b = (g^2 + 1) / (kappa + 3 (n-1)^2 / ((n-2)(n-3)))`` with ``g`` and ``kappa`` the bias-corrected
    sample skewness and excess kurtosis (as ``scipy.stats.skew(x, bias=False)`` and
    ``scipy.stats.kurtosis(x, bias=False)``). Values above 5/9 (the value of a uniform distribution)
    suggest two modes. Non-finite values are ignored.

    Args:
        values: any tensor (e.g. per-prompt entropies ``[..., B]``).
        dim: the dimension to reduce.

    Returns:
        ``values`` reduced over ``dim``; NaN where fewer than 4 finite values remain or all are equal.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import bimodality
        >>> two_clusters = torch.cat([torch.zeros(10), torch.ones(10)])
        >>> evenly_spread = torch.arange(20.0)
        >>> bimodality(torch.stack([two_clusters, evenly_spread]))
        tensor([0.7669, 0.4275])
    """
    _check_real(values, "values")
    if values.dim() == 0:
        raise ValueError("`values` must have at least one dimension")
    x = values.movedim(dim, -1).to(torch.float64)
    finite = torch.isfinite(x)
    n = finite.sum(-1).to(torch.float64)
    x = torch.where(finite, x, 0.0)
    mean = x.sum(-1, keepdim=True) / n.unsqueeze(-1)
    dev = torch.where(finite, x - mean, 0.0)
    m2 = (dev**2).sum(-1) / n
    m3 = (dev**3).sum(-1) / n
    m4 = (dev**4).sum(-1) / n
    spread = torch.where(finite, x.abs(), 0.0).amax(-1)
    skew = torch.sqrt(n * (n - 1)) / (n - 2) * m3 / m2.pow(1.5)
    # kappa + 3(n-1)^2/((n-2)(n-3)) simplifies to (n^2-1) m4 / (m2^2 (n-2)(n-3)); no cancellation
    denominator = (n * n - 1) * m4 / (m2 * m2 * (n - 2) * (n - 3))
    result = (skew * skew + 1) / denominator
    undefined = (n < 4) | ~(torch.sqrt(m2) > ZERO_ROW_RTOL * spread)
    return torch.where(undefined, math.nan, result).to(_result_dtype(values))


